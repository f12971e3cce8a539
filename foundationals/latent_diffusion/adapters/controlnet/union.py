"""ControlNet Union / ProMax (xinsir's controlnet-union-sdxl-1.0): one ControlNet for many kinds of hint.

It is an SDXL ControlNet with three additions:
- a control-type embedding: the one-hot vector of the control types in use (openpose, depth, ...), each entry
  lifted to sinusoidal features, concatenated and encoded by an MLP, added to the timestep embedding
  (`ControlTypeEmbedding`, keys `control_add_embedding.linear_{1,2}`);
- a task embedding: one learned vector per control type (`task_embedding`), added to each hint's pooled
  features;
- the multi-condition fuser (`UnionHintEmbedding`): each hint goes through the hint encoder; its spatial mean
  plus its type's task vector is a token; the tokens go through a transformer block (`transformer_layes`)
  and a projection (`spatial_ch_projs`) to one vector per hint, broadcast over the hint's feature map and
  added to it; the sum over hints is added to the first convolution's output (where a plain ControlNet
  adds its single encoded hint).

The union transformer, as the public weights run it (diffusers' `ControlNetUnionModel` at batch 1, ComfyUI
core with its one hint per application), never mixes tokens: each token attends to itself only (softmax
over a single key is 1), so a token's output does not depend on the other hints or on the batch. We compute
it that way (`UnionTransformerBlock` runs each token as a sequence of one). diffusers hands its
`nn.MultiheadAttention` a (batch, tokens, width) tensor in sequence-first layout, which makes its tokens
attend across the *batch* when the batch has more than one item; we do not reproduce that (parity tests
compare at batch 1).

With several hints in one pass (diffusers' multi-condition call), each hint has a weight that scales its
token, its encoded hint and its projected vector (diffusers' `conditioning_scale` list); the residuals are
then not scaled again. With one hint the weight is 1 and the strength scales the residuals, as for any
ControlNet. Type "auto" (no type, as core's SetUnionControlNetType "auto") runs the plain hint encoder on one
hint with an all-zero control-type vector.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .....fluxion import layers as fl
from ...unet import RangeEncoder, SinusoidalEmbedding, TimestepEncoder
from .model import (
    ConditionEncoder,
    ControlNet,
    ControlNetBranch,
    ControlNetConfig,
    ControlNetPatch,
    HintEmbedding,
)

UNION_CONTROL_TYPES = (
    "openpose",
    "depth",
    "hed/pidi/scribble/ted",
    "canny/lineart/anime_lineart/mlsd",
    "normal",
    "segment",
    "tile",
    "repaint",
)
"""The control types in the order of their indices (core's UNION_CONTROLNET_TYPES). The first union release
knows the first 6; ProMax all 8 (tile and repaint/inpaint)."""


@dataclass(frozen=True)
class UnionControlNetConfig:
    """A union ControlNet: the SDXL ControlNet it extends and the sizes of its union parts."""

    controlnet: ControlNetConfig
    num_control_types: int = 8
    type_embedding_dim: int = 256
    transformer_layers: int = 1
    transformer_heads: int = 8

    @property
    def width(self) -> int:
        """Token width: the first UNet level's (320 for SDXL)."""
        return self.controlnet.unet.block_channels[0]


def control_type_index(name: str) -> int | None:
    """The index of a control type name ("auto": None), raising with the list on an unknown name."""
    if name == "auto":
        return None
    if name not in UNION_CONTROL_TYPES:
        raise ValueError(
            f"unknown union control type {name!r}; choose auto or one of {', '.join(UNION_CONTROL_TYPES)}"
        )
    return UNION_CONTROL_TYPES.index(name)


def _as_row(values: Tensor) -> Tensor:
    return values.reshape(1, -1)  # one control-type vector for the whole batch


class ControlTypeEmbedding(fl.Residual):
    """Adds the encoded one-hot control-type vector (context "controlnet" {"control_types"}) to the embedding."""

    def __init__(
        self, config: UnionControlNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        dim = config.type_embedding_dim
        super().__init__(
            fl.UseContext("controlnet", "control_types").compose(_as_row),
            SinusoidalEmbedding(dim),
            fl.Flatten(1),
            RangeEncoder(
                config.num_control_types * dim, config.controlnet.unet.timestep_embedding_dim, device, dtype
            ),
        )


class UnionTransformerBlock(fl.Chain):
    """Pre-norm self-attention and quick-GELU MLP (CLIP's residual block), each token a sequence of its own."""

    def __init__(
        self, width: int, heads: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Residual(
                fl.LayerNorm(width, device=device, dtype=dtype),
                fl.SelfAttention(width, heads, device=device, dtype=dtype),
            ),
            fl.Residual(
                fl.LayerNorm(width, device=device, dtype=dtype),
                fl.Linear(width, 4 * width, device=device, dtype=dtype),
                fl.QuickGeLU(),
                fl.Linear(4 * width, width, device=device, dtype=dtype),
            ),
        )


class UnionHintEmbedding(fl.Chain):
    """Adds the fused hints (context "controlnet" {"conditions": [(hint, type or None, weight)]}) to its input."""

    def __init__(
        self, config: UnionControlNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        base = config.controlnet
        width = config.width
        super().__init__(
            ConditionEncoder(
                base.unet.block_channels[0], base.conditioning_channels, base.hint_channels, device, dtype
            ),
            fl.Parameter(config.num_control_types, width, device=device, dtype=dtype),
            fl.Chain(
                *(
                    UnionTransformerBlock(width, config.transformer_heads, device, dtype)
                    for _ in range(config.transformer_layers)
                )
            ),
            fl.Linear(width, width, device=device, dtype=dtype),
        )

    def forward(self, x: Tensor) -> Tensor:
        conditions: list[tuple[Tensor, int | None, float]] = self.use_context("controlnet")["conditions"]
        encoder, task, transformer, projection = self[0], self[1], self[2], self[3]
        encoded = [encoder(hint) for hint, _, _ in conditions]
        if conditions[0][1] is None:  # "auto": the plain hint path
            return x + encoded[0]
        weights = [weight for _, _, weight in conditions]
        tokens = torch.stack(
            [
                (features.mean(dim=(2, 3)) + task.weight[index].to(features)) * weight
                for features, (_, index, weight) in zip(encoded, conditions)
            ],
            dim=1,
        )  # (B, hints, width)
        batch, count, width = tokens.shape
        mixed = transformer(tokens.reshape(batch * count, 1, width)).reshape(batch, count, width)
        alphas = projection(mixed)
        fused = x * 0.0
        for index, (features, weight) in enumerate(zip(encoded, weights)):
            fused = fused + (features * weight + alphas[:, index, :, None, None] * weight)
        return x + fused


class UnionControlNet(ControlNet):
    """An SDXL ControlNet with control types: hints set with `set_conditions` (`set_hint`: one hint, type auto)."""

    def __init__(
        self,
        config: UnionControlNetConfig,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(config.controlnet, device, dtype)
        self.union_config = config
        timestep: fl.Chain = self.ensure_find(TimestepEncoder)
        timestep.insert(len(timestep) - 1, ControlTypeEmbedding(config, device, dtype))
        hint = self.ensure_find(HintEmbedding)
        first: fl.Chain = self.DownBlocks[0]  # type: ignore[assignment]
        first.replace(hint, UnionHintEmbedding(config, device, dtype))

    @property
    def control_types(self) -> tuple[str, ...]:
        """The names of the control types this file knows (6 for the first union release, 8 for ProMax)."""
        return UNION_CONTROL_TYPES[: self.union_config.num_control_types]

    def check_types(self, types: Sequence[int | None]) -> None:
        """Raise ValueError unless `types` (indices, None: auto) fit this ControlNet and each other."""
        if not types:
            raise ValueError("a union ControlNet needs at least one hint")
        if None in types and len(types) > 1:
            raise ValueError("control type auto works with one hint only; give each of several hints a type")
        count = self.union_config.num_control_types
        for index in types:
            if index is not None and not 0 <= index < count:
                name = UNION_CONTROL_TYPES[index] if 0 <= index < len(UNION_CONTROL_TYPES) else str(index)
                raise ValueError(
                    f"control type {name} ({index}) is beyond the {count} types this union ControlNet knows "
                    f"({', '.join(self.control_types)}); tile and repaint need the ProMax file "
                    "(diffusion_pytorch_model_promax.safetensors)"
                )

    def control_type_vector(self, types: Sequence[int | None], device: Device | str | None = None) -> Tensor:
        """The one-hot vector (num_control_types,) of the types in use (all zero for auto)."""
        self.check_types(types)
        vector = torch.zeros(self.union_config.num_control_types, device=device)
        for index in types:
            if index is not None:
                vector[index] = 1.0
        return vector

    def set_hint(self, hint: Tensor) -> None:
        """One hint with control type auto (the plain hint encoder, an all-zero control-type vector)."""
        self.set_conditions([hint], [None])

    def set_conditions(
        self,
        hints: Sequence[Tensor],
        types: Sequence[int | None],
        weights: Sequence[float] | None = None,
        control_types: Tensor | None = None,
    ) -> None:
        """Hints (B, C, H, W) in [0, 1], each with its control type index (None: auto, one hint only) and weight.

        `control_types`: the one-hot vector of `types` made beforehand (`control_type_vector`), so that a run
        makes it once; by default it is made here.
        """
        if len(hints) != len(types):
            raise ValueError(f"need one control type per hint, got {len(hints)} hints and {len(types)} types")
        if control_types is None:
            control_types = self.control_type_vector(types, hints[0].device)
        else:
            self.check_types(types)
        weights = [1.0] * len(hints) if weights is None else list(weights)
        if len(weights) != len(hints):
            raise ValueError(f"need one weight per hint, got {len(hints)} hints and {len(weights)} weights")
        self.set_context(
            "controlnet", {"conditions": list(zip(hints, types, weights)), "control_types": control_types}
        )


# -- the patch ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnionHint:
    """One hint of a union ControlNet: the image (B, H, W, C in [0, 1]), its control type (None: auto), weight."""

    image: Tensor
    control_type: int | None = None
    weight: float = 1.0


class UnionControlNetBranch(ControlNetBranch):
    """`ControlNetBranch` for a union ControlNet: its hints, each with a type (and a weight when several)."""

    def __init__(
        self,
        controlnet: UnionControlNet,
        hints: Sequence[UnionHint],
        strength: float = 1.0,
        mask: Tensor | None = None,
        mode: str = "balanced",
        uses_guidance: bool = False,
    ) -> None:
        super().__init__(controlnet, hints[0].image, strength, mask, mode, uses_guidance)
        self._hints = tuple(hints)
        self._types = [hint.control_type for hint in hints]
        controlnet.check_types(self._types)
        self._vectors: dict[str, Tensor] = {}

    def set_hint(self, x: Tensor, copies: int, device: Device, dtype: DType) -> None:
        controlnet: UnionControlNet = self.controlnet  # type: ignore[assignment]
        images = [
            self._batched(hint.image, x, copies, device, dtype, slot=i) for i, hint in enumerate(self._hints)
        ]
        if str(device) not in self._vectors:  # once per run: no copy per step
            self._vectors[str(device)] = controlnet.control_type_vector(self._types, device)
        weights = [hint.weight for hint in self._hints] if len(self._hints) > 1 else None
        controlnet.set_conditions(images, self._types, weights, self._vectors[str(device)])

    def description_parts(self) -> list[str]:
        names = ", ".join("auto" if t is None else UNION_CONTROL_TYPES[t] for t in self._types)
        return [f"types={names}", *super().description_parts()]


class UnionControlNetPatch(ControlNetPatch):
    """A union ControlNet for one run: one hint with its type (as core's), or several fused in one pass.

    One hint: `strength` scales the residuals, as for any ControlNet. Several (diffusers' multi-condition call):
    each hint's weight scales its token, features and projected vector, and `strength` scales the result.
    """

    def __init__(
        self,
        controlnet: UnionControlNet,
        hints: Sequence[UnionHint],
        strength: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        mask: Tensor | None = None,
        mode: str = "balanced",
        name: str = "ControlNet Union",
    ) -> None:
        if not hints:
            raise ValueError("a union ControlNet patch needs at least one hint")
        controlnet.check_types([hint.control_type for hint in hints])
        super().__init__(controlnet, hints[0].image, strength, start, end, mask, mode, name)
        self.hints = tuple(hints)

    @property
    def label(self) -> str:
        names = ", ".join(
            "auto" if hint.control_type is None else UNION_CONTROL_TYPES[hint.control_type]
            for hint in self.hints
        )
        return f"{self.name} [{names}] ({self.strength:g}, steps {self.start:g}-{self.end:g}, {self.mode})"

    def make_branch(self, uses_guidance: bool) -> ControlNetBranch:
        controlnet: UnionControlNet = self.controlnet  # type: ignore[assignment]
        return UnionControlNetBranch(
            controlnet, self.hints, self.strength, self.mask, self.mode, uses_guidance
        )
