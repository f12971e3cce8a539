"""ControlNet: a trainable copy of the UNet's encoder that turns a hint image into residuals for the UNet.

The model (`ControlNet`) is declared like the UNet it copies: the same `TimestepEncoder`, `DownBlocks`
(with the hint encoder, the "input hint block", added after the first convolution) and `MiddleBlock`,
then one zero-initialised 1x1 convolution per skip connection and one for the middle block
(`ControlOutputs`). It is a tree of its own, with its own contexts ("diffusion", "cross_attention_block",
"sdxl" as the UNet, "controlnet" {"condition"} for the hint), so `controlnet(latents)` returns the
residuals, equal to diffusers' `ControlNetModel` (before scaling).

In a UNet it runs through `ControlNetAdapter`, which wraps the UNet's `DownBlocks`: its
`ControlNetBranch` reads the latents (its input) and the UNet's timestep and text from the UNet's
contexts, runs the ControlNet, scales and masks the residuals, and publishes them in the UNet's context
"unet" (`control_residuals`, the seam `ResidualAccumulator`/`ControlResidual` read). Any number of
ControlNets (and T2I-Adapters) stack; each one's residuals are kept apart in `control_sources` and
summed in order, so nothing accumulates across UNet calls.

`ControlNetPatch` is the `ModelPatch` that does this for one sampling run, with a start/end window
(diffusers' `controlnet_keep` rule), an optional mask and A1111's control modes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from .....fluxion.casting import compute_placement
from ...guidance import POSITIVE, Halves, halves_for
from ...model_config import SD15_UNET, UNetConfig, unet_family
from ...model_patch import SamplingRun, Undo
from ...resizing import broadcast_batch, resize_hint, resize_mask
from ...unet import DownBlocks, MiddleBlock, TimestepEncoder, UNet, skip_channels

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

CONTROL_MODES = ("balanced", "prompt", "controlnet", "guess")
"""balanced: plain; prompt: A1111 "My prompt is more important" (residual i x 0.825**(last - i));
controlnet: A1111 "ControlNet is more important" (only the conditional half of a CFG batch gets control);
guess: diffusers' guess mode (conditional half only, residual i x logspace(-1, 0)[i])."""
SOFT_INJECTION_BASE = 0.825


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the UNet encoder it copies, and its hint encoder (channels per stage; stride 2 between)."""

    unet: UNetConfig = SD15_UNET
    conditioning_channels: int = 3
    hint_channels: tuple[int, ...] = (16, 32, 96, 256)

    @property
    def downscale_factor(self) -> int:
        """Hint pixels per latent along each side."""
        return 2 ** (len(self.hint_channels) - 1)


SD15_CONTROLNET = ControlNetConfig()


class ConditionEncoder(fl.Chain):
    """The "input hint block": 3x3 convolutions with SiLU, stride 2 between widths, zero conv to the UNet width."""

    def __init__(
        self,
        out_channels: int,
        conditioning_channels: int = 3,
        channels: Sequence[int] = (16, 32, 96, 256),
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        layers: list[fl.Module] = [
            fl.Conv2d(conditioning_channels, channels[0], 3, padding=1, device=device, dtype=dtype),
            fl.SiLU(),
        ]
        for width, next_width in zip(channels, channels[1:]):
            layers += [
                fl.Conv2d(width, width, 3, padding=1, device=device, dtype=dtype),
                fl.SiLU(),
                fl.Conv2d(width, next_width, 3, stride=2, padding=1, device=device, dtype=dtype),
                fl.SiLU(),
            ]
        layers.append(fl.Conv2d(channels[-1], out_channels, 3, padding=1, device=device, dtype=dtype))
        super().__init__(*layers)


class HintEmbedding(fl.Residual):
    """Adds the encoded hint (context "controlnet" {"condition"}) to the first convolution's output."""

    def __init__(
        self, config: ControlNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.UseContext("controlnet", "condition"),
            ConditionEncoder(
                config.unet.block_channels[0],
                config.conditioning_channels,
                config.hint_channels,
                device,
                dtype,
            ),
        )


class ZeroConvolution(fl.Chain):
    """The 1x1 convolution (zero at initialisation) reading skip connection `index` of the ControlNet's encoder."""

    def __init__(
        self, index: int, channels: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        self.index = index
        super().__init__(
            fl.UseContext("unet", "residuals").compose(itemgetter(index)),
            fl.Conv2d(channels, channels, 1, device=device, dtype=dtype),
        )


class ControlOutputs(fl.Parallel):
    """One residual per skip connection (zero convs) and, last, the middle block's (its 1x1 conv)."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        skips = [
            ZeroConvolution(index, channels, device, dtype)
            for index, channels in enumerate(skip_channels(config))
        ]
        width = config.block_channels[-1]
        super().__init__(*skips, fl.Conv2d(width, width, 1, device=device, dtype=dtype))


class ControlNet(fl.Chain):
    """Hint + latents + timestep + text -> one residual per UNet skip connection, then the middle block's."""

    def __init__(
        self,
        config: ControlNetConfig = SD15_CONTROLNET,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config
        self.residual_count = len(skip_channels(config.unet)) + 1
        down_blocks = DownBlocks(config.unet, device, dtype)
        first: fl.Chain = down_blocks[0]  # type: ignore[assignment]
        first.insert(1, HintEmbedding(config, device, dtype))
        for downsample in down_blocks.layers(fl.Downsample):
            if downsample.register_shape:  # no decoder here: nothing reads the sizes back
                downsample.pop(0)
        super().__init__(
            TimestepEncoder(config.unet, device, dtype),
            down_blocks,
            MiddleBlock(config.unet, device, dtype),
            ControlOutputs(config.unet, device, dtype),
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        skips = self.residual_count - 1
        return {
            "unet": {"residuals": [None] * skips, "control_residuals": [0.0] * (skips + 1)},
            "diffusion": {},
            "cross_attention_block": {},
            "range_adapter": {},
            "sdxl": {},
            "controlnet": {},
        }

    def set_timestep(self, timestep: Tensor | float | int) -> None:
        """The diffusion timestep(s): a number, or one per batch item."""
        self.set_context("diffusion", {"timestep": torch.as_tensor(timestep)})

    def set_clip_text_embedding(self, embedding: Tensor) -> None:
        """The text encoder's hidden states (B, tokens, context_dim)."""
        self.set_context("cross_attention_block", {"clip_text_embedding": embedding})

    def set_hint(self, hint: Tensor) -> None:
        """The control image (B, conditioning_channels, H, W) in [0, 1], H and W `downscale_factor` x the latents'."""
        self.set_context("controlnet", {"condition": hint})

    def set_sdxl_conditioning(self, pooled_text_embedding: Tensor, time_ids: Tensor) -> None:
        """SDXL ControlNets: the pooled text embedding and the 6 size/crop time ids."""
        self.set_context("sdxl", {"pooled_text_embedding": pooled_text_embedding, "time_ids": time_ids})


# -- hints, masks, schedules (shared with the T2I-Adapter) ------------------------------------------------------


def is_step_active(step: int, num_steps: int, start: float, end: float) -> bool:
    """diffusers' `controlnet_keep`: step i of N is controlled unless `i/N < start` or `(i+1)/N > end`."""
    return not (step / num_steps < start or (step + 1) / num_steps > end)


class ControlMismatchError(ValueError):
    """A ControlNet or T2I-Adapter built for another model family (or shape) than the UNet it is applied to."""


def check_controlnet_fits(config: ControlNetConfig, unet: UNetConfig, what: str = "this ControlNet") -> None:
    """Raise `ControlMismatchError` unless the ControlNet's residuals fit the UNet's skips and text."""
    theirs, ours = config.unet, unet
    if (theirs.context_dim, theirs.addition_embedding) != (ours.context_dim, ours.addition_embedding):
        raise ControlMismatchError(
            f"{what} is for {unet_family(theirs)} (context dim {theirs.context_dim}); "
            f"the model is {unet_family(ours)} (context dim {ours.context_dim})"
        )
    if (theirs.block_channels, theirs.layers_per_block) != (ours.block_channels, ours.layers_per_block):
        raise ControlMismatchError(
            f"{what} has UNet levels {theirs.block_channels} x {theirs.layers_per_block} layers; "
            f"the model has {ours.block_channels} x {ours.layers_per_block}"
        )


# -- the adapter -------------------------------------------------------------------------------------------------


def publish_control(unet_context: dict[str, Any], source: object, residuals: list[Tensor] | None) -> None:
    """Set one source's residuals (None: inactive) and recompute `control_residuals` as base + every source, in order."""
    sources: dict[object, list[Tensor] | None] = unet_context["control_sources"]
    sources[source] = residuals
    total: list[Tensor | float] = list(unet_context["control_base"])
    for contribution in sources.values():
        if contribution is not None:
            total = [a + b for a, b in zip(total, contribution)]
    unet_context["control_residuals"] = total


def register_control_source(unet_context: dict[str, Any], source: object) -> None:
    """Make room for a source in the UNet's context "unet" (the first one remembers the base residuals)."""
    if "control_sources" not in unet_context:
        unet_context["control_sources"] = {}
        unet_context["control_base"] = unet_context["control_residuals"]
    unet_context["control_sources"][source] = None


def unregister_control_source(unet_context: dict[str, Any], source: object) -> None:
    """Remove a source; the last one out restores the base residuals exactly."""
    sources = unet_context.get("control_sources", {})
    sources.pop(source, None)
    if sources:
        publish_control(unet_context, next(iter(sources)), sources[next(iter(sources))])
    elif "control_base" in unet_context:
        unet_context["control_residuals"] = unet_context.pop("control_base")
        unet_context.pop("control_sources", None)


class ControlNetBranch(fl.ContextModule):
    """Runs a ControlNet on the UNet's latents and conditioning and publishes its scaled, masked residuals."""

    def __init__(
        self,
        controlnet: ControlNet,
        hint: Tensor,
        strength: float = 1.0,
        mask: Tensor | None = None,
        mode: str = "balanced",
        uses_guidance: bool = False,
    ) -> None:
        super().__init__()
        if mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {mode!r}; choose one of {', '.join(CONTROL_MODES)}")
        self._controlnet = [controlnet]  # its own tree: not a child, so it keeps its own contexts
        self._hint = hint
        self._mask = mask
        self._prepared: dict[tuple[object, ...], Tensor] = {}
        self.strength = strength
        self.mode = mode
        self.uses_guidance = uses_guidance
        self.halves: Halves = halves_for(uses_guidance)
        """The batch layout of the UNet pass (a guidance pass may run one half alone, see `guidance.py`)."""
        self.active = True
        self.window: tuple[tuple[int, int, int, int], tuple[int, int]] | None = None
        """Tiled sampling: (the tile, the whole latent's size) in latent cells; the hint is cropped to the tile."""

    @property
    def controlnet(self) -> ControlNet:
        return self._controlnet[0]

    def forward(self, x: Tensor) -> Tensor:
        context = self.use_context("unet")
        publish_control(context, self, self.residuals(x) if self.active and self.strength != 0 else None)
        return x

    def residuals(self, x: Tensor) -> list[Tensor] | None:
        """The scaled (and masked) residuals for latents `x` with the UNet's current conditioning.

        None when nothing is controlled (the negative half alone, in a mode that controls the positive only).
        """
        controlnet = self.controlnet
        text = self.use_context("cross_attention_block")["clip_text_embedding"]
        sdxl = self.use_context("sdxl")
        halves = self.halves
        conditional_only = self.mode in ("controlnet", "guess") and self.uses_guidance
        if conditional_only and POSITIVE not in halves:
            return None
        pooled, time_ids = sdxl.get("pooled_text_embedding"), sdxl.get("time_ids")
        positive = halves.index(POSITIVE) if conditional_only else 0
        if conditional_only and len(halves) > 1:
            x, text = x.chunk(len(halves))[positive], text.chunk(len(halves))[positive]
            pooled = None if pooled is None else pooled.chunk(len(halves))[positive]
            time_ids = None if time_ids is None else time_ids.chunk(len(halves))[positive]
        copies = 1 if conditional_only else len(halves)
        device, dtype = compute_placement(controlnet)
        controlnet.set_timestep(self.use_context("diffusion")["timestep"])
        controlnet.set_clip_text_embedding(text.to(device=device, dtype=dtype))
        if controlnet.config.unet.addition_embedding == "text_time":
            if pooled is None or time_ids is None:
                raise ValueError("an SDXL ControlNet needs the UNet's pooled text embedding and time ids")
            controlnet.set_sdxl_conditioning(pooled.to(device=device, dtype=dtype), time_ids.to(device))
        self.set_hint(x, copies, device, dtype)
        outputs = [output.to(x.dtype) for output in controlnet(x.to(device=device, dtype=dtype))]
        outputs = self._scaled(outputs)
        if self._mask is not None:
            mask = self._batched(self._mask, x, copies, x.device, torch.float32, is_mask=True)
            outputs = [o * self._mask_on(mask, o) for o in outputs]
        if conditional_only and len(halves) > 1:  # the other halves get no control
            outputs = [
                torch.cat([o if index == positive else torch.zeros_like(o) for index in range(len(halves))])
                for o in outputs
            ]
        return outputs

    def set_hint(self, x: Tensor, copies: int, device: Device, dtype: DType) -> None:
        """Give the ControlNet its hint for latents `x` (prepared once per shape, see `_batched`)."""
        self.controlnet.set_hint(self._batched(self._hint, x, copies, device, dtype))

    def _scaled(self, outputs: list[Tensor]) -> list[Tensor]:
        count = len(outputs)
        if self.mode == "guess":
            scales = torch.logspace(-1, 0, count, device=outputs[0].device) * self.strength
            return [output * scale for output, scale in zip(outputs, scales)]
        if self.mode == "prompt":
            return [
                o * (SOFT_INJECTION_BASE ** (count - 1 - i) * self.strength) for i, o in enumerate(outputs)
            ]
        return [output * self.strength for output in outputs]

    def _batched(
        self,
        source: Tensor,
        x: Tensor,
        copies: int,
        device: Device,
        dtype: DType,
        is_mask: bool = False,
        slot: int = 0,
    ) -> Tensor:
        """The hint (or mask) for latents `x`: resized, batch broadcast, repeated per batch half and moved to
        `device` in `dtype` once per shape (every later step reuses it: no copy per step); `slot` tells several
        sources of one branch apart."""
        batch = x.shape[0] // copies
        window = (
            self.window if self.window is not None and self.window[0][:2] == tuple(x.shape[-2:]) else None
        )
        key = (int(is_mask), *x.shape[-2:], batch, copies, str(device), str(dtype), window, slot)
        if key not in self._prepared:
            factor = self.controlnet.config.downscale_factor
            if is_mask:
                prepared = broadcast_batch(source if source.dim() > 2 else source[None], batch)
                if window is not None:  # the tile's part of the mask over the whole latent
                    prepared = _tile_of(
                        resize_mask(prepared.float(), _pixels(window[1], factor), "bilinear"), window, factor
                    )
            else:
                if window is None:
                    hint = resize_hint(source, x.shape[-2] * factor, x.shape[-1] * factor)
                else:  # the hint covers the whole latent: the tile's part of it
                    hint = _tile_of(resize_hint(source, *_pixels(window[1], factor)), window, factor)
                prepared = broadcast_batch(hint, batch)
            prepared = torch.cat([prepared] * copies) if copies > 1 else prepared
            self._prepared[key] = prepared.to(device=device, dtype=dtype)
        return self._prepared[key]

    def _mask_on(self, mask: Tensor, output: Tensor) -> Tensor:
        """The mask resized ("area") to one residual's grid, made once per grid and batch."""
        key = ("mask_on", id(mask), *output.shape[-2:], output.shape[0])
        if key not in self._prepared:
            resized = resize_mask(mask, output.shape[-2:], "area", output.shape[0])
            self._prepared[key] = resized.to(dtype=output.dtype)
        return self._prepared[key]

    def description_parts(self) -> list[str]:
        return [f"controlnet={unet_family(self.controlnet.config.unet)}", *super().description_parts()]


def _pixels(size: tuple[int, int], factor: int) -> tuple[int, int]:
    return size[0] * factor, size[1] * factor


def _tile_of(image: Tensor, window: tuple[tuple[int, int, int, int], tuple[int, int]], factor: int) -> Tensor:
    """The part of a (B, C, H, W) image over the whole latent that lies under the tile (tiled sampling)."""
    height, width, top, left = (value * factor for value in window[0])
    return image[..., top : top + height, left : left + width]


class ControlNetAdapter(fl.Chain, Adapter[DownBlocks]):
    """Wraps the UNet's `DownBlocks`: the ControlNet branch runs first, on the same latents."""

    def __init__(self, target: DownBlocks, branch: ControlNetBranch) -> None:
        with self.setup_adapter(target):
            super().__init__(branch, target)

    @property
    def branch(self) -> ControlNetBranch:
        return self.ensure_find(ControlNetBranch)

    def inject(self, parent: fl.Chain | None = None) -> ControlNetAdapter:
        super().inject(parent)
        register_control_source(self.use_context("unet"), self[0])
        return self

    def eject(self) -> None:
        unregister_control_source(self.use_context("unet"), self[0])
        super().eject()


# -- the model patch ---------------------------------------------------------------------------------------------


def check_control_settings(mode: str, start: float, end: float) -> None:
    """Refuse an unknown control mode or a step window outside 0 <= start <= end <= 1 (every ControlNet patch)."""
    if mode not in CONTROL_MODES:
        raise ValueError(f"unknown control mode {mode!r}; choose one of {', '.join(CONTROL_MODES)}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"need 0 <= start <= end <= 1, got start={start}, end={end}")


class ControlNetPatch:
    """A ControlNet for one sampling run: hint, strength, start/end fraction of the steps, mask and mode."""

    def __init__(
        self,
        controlnet: ControlNet,
        hint: Tensor,
        strength: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        mask: Tensor | None = None,
        mode: str = "balanced",
        name: str = "ControlNet",
    ) -> None:
        check_control_settings(mode, start, end)
        self.controlnet, self.hint, self.strength = controlnet, hint, strength
        self.start, self.end, self.mask, self.mode, self.name = start, end, mask, mode, name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.strength:g}, steps {self.start:g}-{self.end:g}, {self.mode})"

    def models(self) -> tuple[ControlNet]:
        """The ControlNet: brought to the run's device with the UNet (see `model_patch.patch_models`)."""
        return (self.controlnet,)

    def make_branch(self, uses_guidance: bool) -> ControlNetBranch:
        """The branch that runs the ControlNet in the UNet for one run."""
        return ControlNetBranch(
            self.controlnet, self.hint, self.strength, self.mask, self.mode, uses_guidance=uses_guidance
        )

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Inject into `model.unet`; the undo ejects it and restores the UNet's contexts exactly."""
        unet: UNet = model.unet
        check_controlnet_fits(self.controlnet.config, unet.config)
        if run is None:
            return lambda: None
        # The ControlNet runs where it is (the host loads it with the UNet: `models()`); inputs go to it.
        branch = self.make_branch(run.uses_guidance)
        adapter = ControlNetAdapter(unet.ensure_find(DownBlocks), branch).inject()

        def on_step(step: int) -> None:
            branch.active = is_step_active(step, run.num_steps, self.start, self.end)

        def follow_halves(halves: Halves) -> None:
            branch.halves = halves

        def follow_window(window: tuple[int, int, int, int] | None) -> None:
            branch.window = None if window is None else (window, (run.latent_height, run.latent_width))

        run.on_step(on_step)
        run.on_halves(follow_halves)
        run.on_window(follow_window)

        def undo() -> None:
            if on_step in run.step_hooks:
                run.step_hooks.remove(on_step)
            if follow_window in run.window_listeners:
                run.window_listeners.remove(follow_window)
            if follow_halves in run.halves_listeners:
                run.halves_listeners.remove(follow_halves)
            adapter.eject()

        return undo
