"""Self-attention guidance (SAG, Hong et al. 2023), SD1.5 and SDXL: steer away from a locally blurred prediction.

As diffusers' `StableDiffusionSAGPipeline` (and ComfyUI's SelfAttentionGuidance): the step's main pass records
the attention probabilities of the middle block's first self-attention (computed explicitly there, softmax
of `q k^T / sqrt(d)`; the last call of the main pass, which is the generation's own). From the unconditional half (the conditional one when the step has no CFG):

1. mask: the attention each key receives, averaged over heads and summed over queries, `> 1` (tokens that
   draw more than an average share), at the block's grid, resized (nearest) to the latent size;
2. degraded latents: the predicted clean latents `x0`, Gaussian-blurred (9 taps, `blur_sigma`, reflect
   padding) inside the mask, noised back to the step's level with the same half's predicted noise;
3. one more UNet pass of the degraded latents with that half's conditioning, and
   `prediction += scale * (unconditional - degraded prediction)`.

`x0` and the noise come from the UNet input at the step's timestep (any solver: the input is the
variance-preserving latent), epsilon or v-prediction. ComfyUI's node defaults to `blur_sigma` 2, diffusers
uses 1. Latents of 4 or fewer cells on a side are too small for the blur's padding: SAG skips them (as
ComfyUI). Cost: one extra UNet pass of batch B per step.
"""

from __future__ import annotations

from itertools import count
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from ...guidance import NEGATIVE, POSITIVE, GuidanceHook, GuidanceStep, Halves
from ...model_patch import SamplingRun, Undo
from ...unet import UNet
from .layers import attention_slot, middle_self_attention

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

_IDS = count()


def gaussian_blur(image: Tensor, kernel_size: int = 9, sigma: float = 1.0) -> Tensor:
    """Separable-kernel Gaussian blur of (B, C, H, W), reflect-padded to keep the size."""
    half = (kernel_size - 1) / 2
    positions = torch.linspace(-half, half, steps=kernel_size)
    weights = torch.exp(-0.5 * (positions / sigma) ** 2)
    weights = (weights / weights.sum()).to(device=image.device, dtype=image.dtype)
    kernel = (weights[:, None] @ weights[None, :]).expand(image.shape[1], 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    return F.conv2d(F.pad(image, [pad, pad, pad, pad], mode="reflect"), kernel, groups=image.shape[1])


class AttentionRecorder(fl.Chain, Adapter[fl.Module]):
    """Wraps a self-attention's attention slot: when armed, attends explicitly and keeps the probabilities."""

    def __init__(self, target: fl.Module, context: str, num_heads: int) -> None:
        self.context = context
        self.num_heads = num_heads
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, *rest: Any) -> Tensor:
        state = self.use_context(self.context)
        if not state["armed"] or rest:
            return self[0](query, key, value, *rest)
        # armed for the whole main pass: the last call is the generation's own (reference-only runs the UNet
        # on its reference inside the pass, first)
        batch, length, width = query.shape
        heads, head_width = self.num_heads, width // self.num_heads

        def split(x: Tensor) -> Tensor:
            return x.reshape(batch, -1, heads, head_width).transpose(1, 2)

        scores = split(query) @ split(key).transpose(-1, -2) * head_width**-0.5
        probabilities = scores.softmax(dim=-1)
        output = (probabilities.to(value.dtype) @ split(value)).transpose(1, 2).reshape(batch, length, -1)
        halves: Halves = state["halves"]
        state["maps"] = dict(zip(halves, probabilities[..., :length].chunk(len(halves))))
        state["grid"] = tuple(self.use_context("spatial_transformer")["image"].shape[-2:])
        return output


def degraded_latents(
    clean: Tensor,
    noise: Tensor,
    alpha_bar: Tensor,
    probabilities: Tensor,
    grid: tuple[int, int],
    sigma: float,
) -> Tensor:
    """SAG's degraded input: `clean` blurred where the attention `probabilities` (B, heads, L, L) concentrate."""
    batch, channels, height, width = clean.shape
    mask = probabilities.mean(1).sum(1) > 1.0  # (B, L): keys drawing more than an average share
    mask = mask.reshape(batch, *grid)[:, None].repeat(1, channels, 1, 1).to(probabilities.dtype)
    mask = F.interpolate(mask, (height, width)).to(clean.dtype)
    blurred = gaussian_blur(clean, 9, sigma) * mask + clean * (1 - mask)
    alpha = alpha_bar.to(clean.dtype)
    return alpha**0.5 * blurred + (1 - alpha) ** 0.5 * noise


class SelfAttentionGuidance:
    """SAG's recorder injected in a UNet's middle block; `eject()` restores the UNet."""

    def __init__(self, unet: UNet) -> None:
        self.unet = unet
        self.context = f"sag_{next(_IDS)}"
        attention, slot = attention_slot(middle_self_attention(unet))
        unet.set_context(self.context, {"armed": False, "halves": (POSITIVE,), "maps": {}, "grid": None})
        self.recorder = AttentionRecorder(slot, self.context, attention.num_heads).inject(attention)

    @property
    def state(self) -> dict[str, Any]:
        return self.unet.use_context(self.context)

    def eject(self) -> None:
        if self.recorder.parent is not None:
            self.recorder.eject()
        self.unet.provider.contexts.pop(self.context, None)


class SAGHook(GuidanceHook):
    """Records the main pass's attention, then adds `scale * (unconditional - degraded prediction)`."""

    def __init__(self, guidance: SelfAttentionGuidance, scale: float, blur_sigma: float) -> None:
        self.guidance = guidance
        self.scale = scale
        self.blur_sigma = blur_sigma

    def before(self, step: GuidanceStep) -> None:
        state = self.guidance.state
        state.update(armed=self.scale != 0 and min(step.model_input.shape[-2:]) > 4, maps={})

    def after_main_pass(self, step: GuidanceStep) -> None:
        self.guidance.state["armed"] = False

    def adjust(
        self, step: GuidanceStep, unconditional: Tensor | None, conditional: Tensor, prediction: Tensor
    ) -> Tensor:
        state = self.guidance.state
        half = NEGATIVE if unconditional is not None else POSITIVE
        probabilities = state["maps"].get(half)
        if probabilities is None:  # scale 0, or too small a latent to blur
            return prediction
        source = unconditional if unconditional is not None else conditional
        noise = step.to_noise(source)
        degraded = degraded_latents(
            step.to_clean(source), noise, step.alpha_bar(), probabilities, state["grid"], self.blur_sigma
        )
        extra = step.model_input[:, step.latent_channels :]  # an inpainting model's mask and masked image
        model_input = torch.cat([degraded.to(step.model_input.dtype), extra], dim=1)
        degraded_prediction = step.passes.one(model_input, half)
        return prediction + self.scale * (source - degraded_prediction)


class SAGPatch:
    """A `ModelPatch`: self-attention guidance for the run (see the module doc)."""

    def __init__(self, scale: float = 0.75, blur_sigma: float = 1.0) -> None:
        if blur_sigma <= 0:
            raise ValueError(f"SAG blur_sigma must be > 0, got {blur_sigma}")
        self.scale, self.blur_sigma = scale, blur_sigma

    @property
    def label(self) -> str:
        return f"SAG (scale {self.scale:g}, blur sigma {self.blur_sigma:g})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        guidance = SelfAttentionGuidance(model.unet)
        guidance.state["halves"] = run.stored_halves
        hook = SAGHook(guidance, self.scale, self.blur_sigma)

        def follow_halves(halves: Halves) -> None:
            guidance.state["halves"] = halves

        run.guidance.append(hook)
        run.on_halves(follow_halves)

        def undo() -> None:
            if hook in run.guidance:
                run.guidance.remove(hook)
            if follow_halves in run.halves_listeners:
                run.halves_listeners.remove(follow_halves)
            guidance.eject()

        return undo
