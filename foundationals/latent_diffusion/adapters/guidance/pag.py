"""Perturbed-attention guidance (PAG, Ahn et al. 2024): steer away from a prediction with degraded self-attention.

Each step runs one more UNet pass on the positive half with the chosen self-attention layers perturbed:
their attention map is replaced by the identity, so each token's output is its own value projection
(`to_out(to_v(x))`, diffusers' `PAGIdentitySelfAttnProcessor`, ComfyUI's `attn1` replacement returning v).
The prediction becomes `cfg + scale * (conditional - perturbed)` (without CFG: `conditional + scale * (...)`),
as diffusers' PAG pipelines and ComfyUI's PerturbedAttentionGuidance. With `adaptive_scale` > 0 the scale
decays with the timestep: `max(0, scale - adaptive_scale * (1000 - t))` (diffusers' `pag_adaptive_scale`).

Layers are diffusers module names matched as regular expressions (default `"mid"`: every self-attention of
the middle block, which is what ComfyUI's node perturbs). Cost: one extra UNet pass of batch B per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import count
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from ...guidance import POSITIVE, GuidanceHook, GuidanceStep
from ...model_patch import SamplingRun, Undo
from ...unet import UNet
from .layers import attention_slot, match_self_attention_blocks

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

_IDS = count()


class PerturbedAttention(fl.Chain, Adapter[fl.Module]):
    """Wraps a self-attention's attention slot: in the perturbed pass each token attends to itself only."""

    def __init__(self, target: fl.Module, context: str) -> None:
        self.context = context
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *rest: Any) -> Tensor:
        if not self.use_context(self.context)["perturbed"]:
            return self[0](query, key, value, *rest)
        # identity attention: token i's output is its own value (keys/values may extend past the queries,
        # e.g. reference-only appends the reference's tokens: they get no weight)
        return value[:, : query.shape[1]]


class PerturbedAttentionGuidance:
    """PAG injected in a UNet: `perturbed()` turns the perturbation on for one pass; `eject()` restores the UNet."""

    def __init__(self, unet: UNet, layers: Sequence[str] = ("mid",)) -> None:
        self.unet = unet
        self.context = f"pag_{next(_IDS)}"
        blocks = match_self_attention_blocks(unet, layers)
        self.layer_names = [name for name, _ in blocks]
        unet.set_context(self.context, {"perturbed": False})
        self.adapters: list[PerturbedAttention] = []
        try:
            for _, block in blocks:
                attention, slot = attention_slot(block)
                self.adapters.append(PerturbedAttention(slot, self.context).inject(attention))
        except BaseException:
            self.eject()
            raise

    def set_perturbed(self, perturbed: bool) -> None:
        self.unet.use_context(self.context)["perturbed"] = perturbed

    def eject(self) -> None:
        for adapter in reversed(self.adapters):
            if adapter.parent is not None:
                adapter.eject()
        self.unet.provider.contexts.pop(self.context, None)


class PAGHook(GuidanceHook):
    """The guidance term: one perturbed pass on the positive half, `scale * (conditional - perturbed)`."""

    def __init__(
        self, guidance: PerturbedAttentionGuidance, scale: float, adaptive_scale: float = 0.0
    ) -> None:
        self.guidance = guidance
        self.scale = scale
        self.adaptive_scale = adaptive_scale

    def scale_at(self, timestep: Tensor) -> float:
        if self.adaptive_scale <= 0:
            return self.scale
        return max(0.0, self.scale - self.adaptive_scale * (1000 - float(timestep.reshape(-1)[0])))

    def adjust(
        self, step: GuidanceStep, unconditional: Tensor | None, conditional: Tensor, prediction: Tensor
    ) -> Tensor:
        scale = self.scale_at(step.timestep)
        if scale == 0:
            return prediction
        self.guidance.set_perturbed(True)
        try:
            perturbed = step.passes.one(step.model_input, POSITIVE)
        finally:
            self.guidance.set_perturbed(False)
        return prediction + scale * (conditional - perturbed)


class PAGPatch:
    """A `ModelPatch`: perturbed-attention guidance for the run (see the module doc)."""

    def __init__(
        self, scale: float = 3.0, layers: Sequence[str] = ("mid",), adaptive_scale: float = 0.0
    ) -> None:
        layers = tuple(layer.strip() for layer in layers if layer.strip())
        if not layers:
            raise ValueError("PAG needs at least one layer pattern (e.g. 'mid')")
        if scale < 0 or adaptive_scale < 0:
            raise ValueError(f"PAG scale and adaptive scale must be >= 0, got {scale}, {adaptive_scale}")
        self.scale, self.layers, self.adaptive_scale = scale, layers, adaptive_scale

    @property
    def label(self) -> str:
        adaptive = f", adaptive {self.adaptive_scale:g}" if self.adaptive_scale else ""
        return f"PAG (scale {self.scale:g}{adaptive}; layers {', '.join(self.layers)})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        guidance = PerturbedAttentionGuidance(model.unet, self.layers)
        hook = PAGHook(guidance, self.scale, self.adaptive_scale)
        run.guidance.append(hook)

        def undo() -> None:
            if hook in run.guidance:
                run.guidance.remove(hook)
            guidance.eject()

        return undo
