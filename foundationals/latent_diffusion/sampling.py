"""The denoising loop shared by every pipeline and the sampler node.

Classifier-free guidance runs the unconditional and conditional branches as one batch
(`[negative, positive]`, as diffusers does), the solver moves the latents one step at a time, and
a per-step callback reports progress and may cancel by raising.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from .guidance import NEGATIVE, POSITIVE, ConditionedPasses, GuidanceStack, GuidanceStep
from .solvers import Solver


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on: the text embedding and, for SDXL, pooled text and time ids."""

    text_embedding: Tensor
    pooled_text_embedding: Tensor | None = None
    time_ids: Tensor | None = None

    def repeat(self, batch_size: int) -> Conditioning:
        """Repeat a one-item conditioning for a batch (items already batched are kept)."""

        def fit(tensor: Tensor | None) -> Tensor | None:
            if tensor is None or tensor.shape[0] == batch_size:
                return tensor
            if tensor.shape[0] != 1:
                raise ValueError(
                    f"conditioning batch {tensor.shape[0]} does not match latent batch {batch_size}"
                )
            return tensor.expand(batch_size, *tensor.shape[1:])

        return Conditioning(fit(self.text_embedding), fit(self.pooled_text_embedding), fit(self.time_ids))  # type: ignore[arg-type]

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        return replace(
            self,
            text_embedding=move(self.text_embedding),  # type: ignore[arg-type]
            pooled_text_embedding=move(self.pooled_text_embedding),
            time_ids=move(self.time_ids),
        )


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning: original size, crop top-left and target size, in pixels."""

    original_size: tuple[int, int] = (1024, 1024)
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (1024, 1024)

    @classmethod
    def for_image(cls, height: int, width: int) -> SizeConditioning:
        """diffusers' default for a (height, width) output: original = target = that size, no crop."""
        return cls((height, width), (0, 0), (height, width))

    def time_ids(self) -> Tensor:
        """(1, 6) as diffusers' `add_time_ids`: (height, width, top, left, target height, target width)."""
        return torch.tensor(
            [[*self.original_size, *self.crop_top_left, *self.target_size]], dtype=torch.float32
        )


def concatenate(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditionings along the batch (CFG's `[negative, positive]`)."""

    def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None or b is None:
            if a is not None or b is not None:
                raise ValueError("both conditionings must have the same parts (pooled text, time ids)")
            return None
        if a.shape[1:] != b.shape[1:]:
            a, b = _pad_to_same_length(a, b)
        return torch.cat([a, b])

    return Conditioning(
        cat(first.text_embedding, second.text_embedding),
        cat(first.pooled_text_embedding, second.pooled_text_embedding),
        cat(first.time_ids, second.time_ids),
    )  # type: ignore[arg-type]


def _pad_to_same_length(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Long prompts give longer embeddings: repeat the shorter one's 77-token chunks as ComfyUI does."""
    if a.dim() != 3 or a.shape[2] != b.shape[2]:
        raise ValueError(f"cannot batch text embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    length = max(a.shape[1], b.shape[1])

    def grow(t: Tensor) -> Tensor:
        if t.shape[1] == length:
            return t
        if length % t.shape[1] != 0:
            raise ValueError(
                f"text embedding lengths {a.shape[1]} and {b.shape[1]} are not multiples of each other"
            )
        return t.repeat(1, length // t.shape[1], 1)

    return grow(a), grow(b)


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


def denoise(
    unet: Denoiser,
    solver: Solver,
    latents: Tensor,
    positive: Conditioning,
    negative: Conditioning | None = None,
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
    """
    batch = latents.shape[0]
    use_guidance = guidance_scale > 1.0 and negative is not None
    conditioning = positive.repeat(batch)
    if use_guidance:
        assert negative is not None
        conditioning = concatenate(negative.repeat(batch), conditioning)
    parameter = next(iter(getattr(unet, "parameters", lambda: iter([latents]))()), latents)
    conditioning = conditioning.to(parameter.device, parameter.dtype)
    _apply_conditioning(unet, conditioning)
    dtype = latents.dtype
    passes = (
        None
        if guidance is None
        else _passes(unet, predict, positive, negative, batch, use_guidance, parameter, dtype)
    )
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
        if use_guidance:
            model_input = torch.cat([model_input, model_input])
        prediction = (predict or unet)(model_input.to(parameter.dtype)).to(dtype)
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
    parameter: Tensor,
    output_dtype: torch.dtype,
) -> ConditionedPasses:
    """The UNet passes guidance hooks run: both halves as one batch (as `denoise` set it up) or one half."""
    device, dtype = parameter.device, parameter.dtype
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
