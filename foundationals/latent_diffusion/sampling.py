"""The denoising loop shared by every pipeline and the sampler node.

Classifier-free guidance runs the unconditional and conditional branches as one batch
(`[negative, positive]`, as diffusers does), the solver moves the latents one step at a time, and
a per-step callback reports progress and may cancel by raising. Each side is one `Conditioning`, or a list
of `ConditioningEntry`s combined at every step as ComfyUI combines a CONDITIONING list (`conditioning.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ...fluxion.casting import compute_placement
from .conditioning import (  # re-exported: the conditioning types used to live here
    CombinedConditioning,
    Conditioning,
    ConditioningEntry,
    SizeConditioning,
    concatenate,
)
from .guidance import NEGATIVE, POSITIVE, ConditionedPasses, GuidanceStack, GuidanceStep
from .solvers import Solver

PromptConditioning = Conditioning | Sequence[ConditioningEntry]
"""One conditioning, or a list of entries combined as ComfyUI combines a CONDITIONING list."""


class Denoiser(Protocol):
    """A UNet: conditioning goes in by context, then `denoiser(x)` predicts the noise."""

    def set_timestep(self, timestep: Tensor) -> None: ...
    def set_clip_text_embedding(self, clip_text_embedding: Tensor) -> None: ...
    def __call__(self, x: Tensor) -> Tensor: ...


StepCallback = Callable[[int, int, Tensor], None]
"""Called after each step with (steps done, total steps, current latents); raise to cancel."""


@dataclass(frozen=True)
class InpaintingInputs:
    """Inpainting: `mask` (B,1,h,w latent size, 1 = repaint) and the clean latents of the source image.

    A 9-channel model gets `[latents, mask, masked_image_latents]` as input; a regular model keeps
    the unmasked region on the source image's noised trajectory (latent blending, as diffusers).
    """

    mask: Tensor
    image_latents: Tensor | None
    masked_image_latents: Tensor | None = None
    noise: Tensor | None = None
    """The initial noise, reused to noise the source at each step when blending (as diffusers)."""


def initial_noise(
    shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> Tensor:
    """`torch.randn(shape, generator=Generator("cpu").manual_seed(seed))`, then moved: ComfyUI's and diffusers' convention."""
    noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def draw_noise(
    shape: tuple[int, ...], generator: torch.Generator, batch_index: Sequence[int] | None = None
) -> Tensor:
    """Initial noise from `generator`: `torch.randn(shape)`, or with `batch_index` (ComfyUI's LATENT key) item i
    gets the `batch_index[i]`-th one-item draw of the sequence, as ComfyUI's `prepare_noise` draws them."""
    if batch_index is None:
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(batch_index) != shape[0]:
        raise ValueError(f"batch_index has {len(batch_index)} indices for a batch of {shape[0]}")
    wanted = sorted(set(batch_index))
    draws: dict[int, Tensor] = {}
    for index in range(wanted[-1] + 1):
        noise = torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        if index in wanted:
            draws[index] = noise
    return torch.cat([draws[index] for index in batch_index])


def _apply_conditioning(unet: Denoiser, conditioning: Conditioning) -> None:
    unet.set_clip_text_embedding(conditioning.text_embedding)
    if conditioning.pooled_text_embedding is not None or conditioning.time_ids is not None:
        set_pooled = getattr(unet, "set_pooled_text_embedding", None)
        set_time_ids = getattr(unet, "set_time_ids", None)
        if set_pooled is None or set_time_ids is None:
            raise ValueError(
                "SDXL conditioning (pooled text, time ids) given to a UNet that does not take it"
            )
        set_pooled(conditioning.pooled_text_embedding)
        set_time_ids(conditioning.time_ids)


def plain_conditioning(conditioning: PromptConditioning, batch_size: int) -> Conditioning | None:
    """The one conditioning a prompt amounts to (a single entry acting everywhere), else None."""
    if isinstance(conditioning, Conditioning):
        return conditioning
    if len(conditioning) != 1 or not conditioning[0].acts_everywhere:
        return None
    plain = conditioning[0].conditioning
    return plain if plain.text_embedding.shape[0] in (1, batch_size) else None


def entries_of(conditioning: PromptConditioning) -> list[ConditioningEntry]:
    """A prompt as a list of entries (one conditioning is one entry acting everywhere)."""
    if isinstance(conditioning, Conditioning):
        return [ConditioningEntry(conditioning)]
    return list(conditioning)


def denoise(
    unet: Denoiser,
    solver: Solver,
    latents: Tensor,
    positive: PromptConditioning,
    negative: PromptConditioning | None = None,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    inpainting: InpaintingInputs | None = None,
    callback: StepCallback | None = None,
    step_hook: Callable[[int], None] | None = None,
    predict: Callable[[Tensor], Tensor] | None = None,
    after_step: Callable[[int, Tensor], Tensor] | None = None,
    guidance: GuidanceStack | None = None,
) -> Tensor:
    """Run the solver's inference steps from `latents`; guidance is skipped when `guidance_scale <= 1`.

    `latents` must already be scaled/noised for the first step (see `prepare_latents`). `step_hook`
    runs before each UNet call with the step index (adapters with start/end windows use it).
    `predict(model_input)` replaces the plain `unet(model_input)` call (regional adapters blend several
    passes there; see `SamplingRun.predict`). `after_step(index, latents)` may replace the latents after
    each step (0-based index), before `callback` sees them. `guidance` (a run's guidance hooks: PAG, SAG,
    rescaled CFG, CFG cutoff; see `guidance.py`) replaces the plain CFG combination of each step.

    `positive` / `negative` are each one `Conditioning` or a list of `ConditioningEntry`s (areas, masks,
    strengths, noise windows), combined at each step as ComfyUI does (see `conditioning.CombinedConditioning`).
    """
    batch = latents.shape[0]
    use_guidance = guidance_scale > 1.0 and negative is not None
    placement = (
        compute_placement(unet) if isinstance(unet, torch.nn.Module) else (latents.device, latents.dtype)
    )
    dtype = latents.dtype
    plain = plain_conditioning(positive, batch)
    plain_negative = plain_conditioning(negative, batch) if use_guidance else None  # type: ignore[arg-type]
    combined: CombinedConditioning | None = None
    if plain is None or (use_guidance and plain_negative is None):
        if guidance is not None:
            raise ValueError(
                "guidance adapters (PAG, SAG, rescaled CFG, CFG cutoff) need one plain prompt per side: "
                "conditioning with areas, masks, strengths or noise windows cannot be combined with them"
            )
        combined = CombinedConditioning(
            entries_of(positive),
            entries_of(negative) if use_guidance else None,  # type: ignore[arg-type]
            latents.shape[-2],
            latents.shape[-1],
            solver.alphas_cumprod,
            solver.params.prediction_type,
        )
    else:
        conditioning = plain.repeat(batch)
        if plain_negative is not None:
            conditioning = concatenate(plain_negative.repeat(batch), conditioning)
        _apply_conditioning(unet, conditioning.to(*placement))
    passes = (
        None
        if guidance is None or plain is None
        else _passes(unet, predict, plain, plain_negative, batch, use_guidance, placement, dtype)
    )

    def set_conditioning(conditioning: Conditioning) -> None:
        _apply_conditioning(unet, conditioning.to(*placement))

    def run_unet(x: Tensor) -> Tensor:
        return (predict or unet)(x.to(placement[1]))

    steps = list(solver.inference_steps)
    current = 0  # index of the step being solved (solvers may evaluate the model again within it)

    def evaluate(model_input: Tensor, timestep: Tensor) -> Tensor:
        """The guided prediction for a scaled model input at `timestep` (solvers call it again within a step)."""
        if inpainting is not None and inpainting.masked_image_latents is not None:
            model_input = torch.cat([model_input, inpainting.mask, inpainting.masked_image_latents], dim=1)
        unet.set_timestep(timestep.reshape(1))
        if guidance is not None and passes is not None:  # the run's guidance hooks combine the passes
            return guidance.predict(
                GuidanceStep(
                    current,
                    len(steps),
                    timestep,
                    model_input,
                    guidance_scale,
                    solver.alphas_cumprod,
                    solver.params.prediction_type.value,
                    passes,
                )
            )
        if combined is not None:
            return combined.predict(
                run_unet, set_conditioning, model_input, timestep, guidance_scale, use_guidance, dtype
            )
        if use_guidance:
            model_input = torch.cat([model_input, model_input])
        prediction = run_unet(model_input).to(dtype)
        if use_guidance:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        return prediction

    for done, step in enumerate(steps, start=1):
        current = done - 1
        if step_hook is not None:
            step_hook(step)
        prediction = evaluate(solver.scale_model_input(latents, step), solver.timesteps[step])
        latents = solver(
            latents, predicted_noise=prediction, step=step, generator=generator, evaluate=evaluate
        )
        if inpainting is not None and inpainting.masked_image_latents is None:
            latents = _blend_with_source(solver, latents, inpainting, step, generator)
        if after_step is not None:
            latents = after_step(done - 1, latents)
        if callback is not None:
            callback(done, len(steps), latents)
    return latents


def _passes(
    unet: Denoiser,
    predict: Callable[[Tensor], Tensor] | None,
    positive: Conditioning,
    negative: Conditioning | None,
    batch: int,
    use_guidance: bool,
    placement: tuple[torch.device, torch.dtype],
    output_dtype: torch.dtype,
) -> ConditionedPasses:
    """The UNet passes guidance hooks run: both halves as one batch (as `denoise` set it up) or one half."""
    device, dtype = placement
    halves = {POSITIVE: positive.repeat(batch).to(device, dtype)}
    if use_guidance and negative is not None:
        halves[NEGATIVE] = negative.repeat(batch).to(device, dtype)
        halves["both"] = concatenate(halves[NEGATIVE], halves[POSITIVE])

    def run_unet(x: Tensor) -> Tensor:
        return (predict or unet)(x.to(dtype))

    return ConditionedPasses(
        run_unet,
        lambda which: _apply_conditioning(unet, halves[which]),
        use_guidance,
        output_dtype,
        current="both" if use_guidance else POSITIVE,  # what `denoise` applied
    )


def _blend_with_source(
    solver: Solver,
    latents: Tensor,
    inpainting: InpaintingInputs,
    step: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Keep the unmasked area on the source image's trajectory, noised to the next step's level."""
    source = inpainting.image_latents
    if source is None:
        raise ValueError("latent blending needs the source image's latents")
    if step + 1 < solver.num_inference_steps:
        noise = inpainting.noise
        if noise is None:
            noise = torch.randn(source.shape, generator=generator, device=source.device, dtype=source.dtype)
        source = solver.add_noise(source, noise, step + 1)
    return (1 - inpainting.mask) * source + inpainting.mask * latents


def prepare_latents(
    solver: Solver,
    noise: Tensor,
    image_latents: Tensor | None = None,
    pure_noise_at_full_strength: bool = False,
) -> Tensor:
    """Starting latents: scaled noise (txt2img) or source latents noised to the first step (img2img).

    With `pure_noise_at_full_strength` a run over all steps starts from pure noise even with a source
    image (diffusers' inpainting pipelines); img2img pipelines noise the source instead.
    """
    if image_latents is None or (pure_noise_at_full_strength and solver.first_inference_step == 0):
        return noise * solver.init_noise_sigma
    if solver.first_inference_step >= solver.num_inference_steps:
        return image_latents
    return solver.add_noise(image_latents, noise, solver.first_inference_step)


__all__ = [
    "Conditioning",
    "ConditioningEntry",
    "Denoiser",
    "InpaintingInputs",
    "PromptConditioning",
    "SizeConditioning",
    "StepCallback",
    "concatenate",
    "denoise",
    "draw_noise",
    "entries_of",
    "initial_noise",
    "plain_conditioning",
    "prepare_latents",
]
