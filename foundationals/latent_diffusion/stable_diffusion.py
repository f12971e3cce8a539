"""Stable Diffusion 1.5 / SDXL pipelines: text-to-image, image-to-image and inpainting.

One object holds the models (UNet, autoencoder, text encoder(s)); each pipeline encodes the
prompts, draws the initial noise with ComfyUI's and diffusers' convention
(`torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`), runs `sampling.denoise`
and decodes. The sampler node calls the same functions, so both give identical results.

SDXL follows diffusers' `StableDiffusionXL*Pipeline`s: time ids from `SizeConditioning` (default: the
output size, no crop; the negative's the same unless given), an empty negative prompt as all zeros
(`force_zeros_for_empty_prompt`, optional), and an fp16 autoencoder that overflows retried in fp32.
`StableDiffusion.from_checkpoint` builds either family from a single file or a diffusers folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from copy import deepcopy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..clip.config import CLIPTextConfig
from ..clip.prompt_encoding import encode_sd15_prompt, encode_sdxl_prompt
from ..clip.prompt_weighting import EmbeddingLookup
from ..clip.text_encoder import CLIPTextEncoder
from .auto_encoder import LatentDiffusionAutoencoder
from .checkpoint import CheckpointError, load_checkpoint
from .limits import check_size
from .model_patch import SamplingRun
from .regional import outside_of_regions
from .sampling import Conditioning, InpaintingInputs, StepCallback, denoise, prepare_latents
from .solvers import (
    DDIM,
    DDPM,
    LCM,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    EulerAncestral,
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
)
from .unet import UNet

SOLVERS: dict[str, type[Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "dpmpp_2m": DPMSolver,
    "dpmpp_2m_sde": DPMSolverSDE,
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "lcm": LCM,
}
"""Solver names as the sampler node lists them."""

SCHEDULES: tuple[str, ...] = ("normal", "karras", "trailing", "linspace")
"""`normal` is the models' own (leading) spacing; `karras` uses Karras sigmas where the solver has sigmas."""

_SIGMA_SOLVERS = (DPMSolver, DPMSolverSDE, Euler, EulerAncestral)


def make_solver(
    name: str,
    steps: int,
    schedule: str = "normal",
    denoise_strength: float = 1.0,
    prediction_type: PredictionType = PredictionType.EPSILON,
    device: torch.device | str = "cpu",
) -> Solver:
    """A solver by name, with the schedule's spacing, starting where `denoise_strength` says (1 = all steps)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    solver_class = SOLVERS[name]
    if schedule == "karras" and not issubclass(solver_class, _SIGMA_SOLVERS):
        raise ValueError(
            f"the karras schedule needs a sigma-based solver (dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral), not {name}"
        )
    spacing = {"trailing": TimestepSpacing.TRAILING, "linspace": TimestepSpacing.LINSPACE}.get(
        schedule, TimestepSpacing.LEADING
    )
    params = SolverParams(
        timesteps_spacing=spacing,
        sigma_schedule=SigmaSchedule.KARRAS if schedule == "karras" else None,
        prediction_type=prediction_type,
    )
    solver = solver_class(num_inference_steps=steps, params=params, device=device)
    if denoise_strength < 1.0:
        solver = solver.rebuild(first_inference_step=solver.first_step_from_strength(denoise_strength))
    return solver


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


@dataclass
class StableDiffusion:
    """The models of one checkpoint and the pipelines that use them."""

    unet: UNet
    autoencoder: LatentDiffusionAutoencoder
    text_encoder: CLIPTextEncoder
    text_encoder_2: CLIPTextEncoder | None = None
    prediction_type: PredictionType = PredictionType.EPSILON
    embeddings: EmbeddingLookup | None = field(default=None, repr=False)
    embeddings_2: EmbeddingLookup | None = field(default=None, repr=False)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_encoder_configs: Mapping[str, CLIPTextConfig] | None = None,
    ) -> StableDiffusion:
        """The models of an SD1.5 or SDXL single file or diffusers folder (see `checkpoint.load_checkpoint`)."""
        checkpoint = load_checkpoint(path, device, dtype, text_encoder_configs=text_encoder_configs)
        sdxl = checkpoint.family.startswith("sdxl")
        needed = ("clip_l", "clip_g") if sdxl else ("clip_l",)
        missing = [name for name in needed if name not in checkpoint.text_encoders]
        if checkpoint.autoencoder is None or missing:
            parts = (["the autoencoder"] if checkpoint.autoencoder is None else []) + [
                f"the {name} text encoder" for name in missing
            ]
            raise CheckpointError(
                f"{checkpoint.source}: this {checkpoint.family} checkpoint lacks {' and '.join(parts)}; "
                "a full pipeline needs them (load them separately, or use a complete checkpoint)"
            )
        encoders = checkpoint.text_encoders
        return cls(
            unet=checkpoint.unet,
            autoencoder=checkpoint.autoencoder,
            text_encoder=encoders["clip_l"],  # type: ignore[arg-type]
            text_encoder_2=encoders["clip_g"] if sdxl else None,  # type: ignore[arg-type]
        )

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def is_inpainting_model(self) -> bool:
        """9-channel UNets take the mask and the masked image's latents as extra input channels."""
        return self.unet.config.in_channels == 9

    @property
    def device(self) -> torch.device:
        return self.unet.device  # type: ignore[return-value]

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config.latent_channels

    def encode_prompt(
        self, prompt: str, clip_skip: int | None = None, size: SizeConditioning | None = None
    ) -> Conditioning:
        """Text conditioning of a ComfyUI-syntax prompt. `clip_skip` is the CLIP layer (-1 last; SDXL default -2)."""
        if self.text_encoder_2 is None:
            text = encode_sd15_prompt(
                prompt, self.text_encoder, layer=clip_skip or -1, embeddings=self.embeddings
            )
            return Conditioning(text.embeddings)
        text = encode_sdxl_prompt(
            prompt,
            self.text_encoder,
            self.text_encoder_2,
            layer=clip_skip or -2,
            embeddings_l=self.embeddings,
            embeddings_g=self.embeddings_2,
        )
        return Conditioning(text.embeddings, text.pooled, (size or SizeConditioning()).time_ids())

    def zero_conditioning(self, like: Conditioning, size: SizeConditioning | None = None) -> Conditioning:
        """All-zero text and pooled embeddings shaped as `like`, with `size`'s time ids (else `like`'s).

        diffusers' SDXL negative for an empty negative prompt (`force_zeros_for_empty_prompt`).
        """
        return Conditioning(
            torch.zeros_like(like.text_embedding),
            None if like.pooled_text_embedding is None else torch.zeros_like(like.pooled_text_embedding),
            like.time_ids if size is None else size.time_ids(),
        )

    def encode_image(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> scaled latents (posterior mean, or a sample with `generator`).

        An fp16 autoencoder whose result overflows (SDXL's does) runs again in fp32, the generator rewound
        so that the sample comes from the same place in its stream.
        """
        state = generator.get_state() if generator is not None else None
        with torch.no_grad():
            latents = self.autoencoder.encode(image * 2 - 1, generator=generator)
            if _overflowed(self.autoencoder, latents):
                if generator is not None and state is not None:
                    generator.set_state(state)
                latents = _float32_copy(self.autoencoder).encode(image.float() * 2 - 1, generator=generator)
        return latents.float()

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> (B, 3, H, W) in [0, 1].

        SDXL's autoencoder overflows in fp16: when an fp16 decode gives NaN or inf, it is decoded again by
        an fp32 copy of the autoencoder (the shared model is left as it is), as diffusers' `force_upcast`.
        """
        with torch.no_grad():
            image = self.autoencoder.decode(latents)
            if _overflowed(self.autoencoder, image):
                image = _float32_copy(self.autoencoder).decode(latents.float())
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def sample(
        self,
        latents_shape: tuple[int, int, int, int],
        positive: Conditioning,
        negative: Conditioning | None,
        solver: Solver,
        guidance_scale: float,
        seed: int,
        image_latents: Tensor | None = None,
        inpainting_mask: Tensor | None = None,
        masked_image_latents: Tensor | None = None,
        callback: StepCallback | None = None,
        step_hook: Callable[[int], None] | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        run: SamplingRun | None = None,
    ) -> Tensor:
        """The shared sampling path: noise from `seed`, img2img start, inpainting, guidance, solver steps.

        One CPU generator seeded with `seed` draws the initial noise (`torch.randn(shape, generator)`,
        ComfyUI's and diffusers' convention) and then any noise the solver needs, as diffusers does.
        Pass `generator` to continue an existing stream (diffusers' img2img samples the VAE first).

        `inpainting_mask` (B, 1, h, w) in latent size, 1 = repaint, needs `image_latents`. A 9-channel
        model also needs `masked_image_latents` (the latents of the image with the masked area blanked);
        other models keep the unmasked area on the source's trajectory each step.

        `run`: the `SamplingRun` the model's patches were applied for (`patched(model, patches, run)`); its
        step hooks run before each step and its regions (masked adapters) are blended into each prediction.
        """
        if run is not None:
            if step_hook is not None:
                raise ValueError("give either run or step_hook: the run's step hooks replace step_hook")
            step_hook = run.run_step_hooks
        factor = self.autoencoder.config.downscale_factor
        check_size(latents_shape[0], latents_shape[-2] * factor, latents_shape[-1] * factor, "sample")
        device = self.device
        if generator is None:
            generator = torch.Generator("cpu").manual_seed(seed)
        if noise is None:
            noise = torch.randn(latents_shape, generator=generator, dtype=torch.float32)
        noise = noise.to(device)
        inpainting: InpaintingInputs | None = None
        if inpainting_mask is not None:
            if image_latents is None and not self.is_inpainting_model:
                raise ValueError("inpainting with a regular model needs the source image's latents")
            mask = inpainting_mask.to(device=device, dtype=noise.dtype)
            source = image_latents.to(device=device, dtype=noise.dtype) if image_latents is not None else None
            masked = None
            if self.is_inpainting_model:
                if masked_image_latents is None:
                    raise ValueError("a 9-channel inpainting model needs the masked image's latents")
                masked = masked_image_latents.to(device=device, dtype=noise.dtype)
            inpainting = InpaintingInputs(
                mask=mask, image_latents=source, masked_image_latents=masked, noise=noise
            )
        elif self.is_inpainting_model:
            raise ValueError("this is an inpainting model (9 input channels): give it an image and a mask")
        start = image_latents.to(device=device, dtype=noise.dtype) if image_latents is not None else None
        latents = prepare_latents(solver, noise, start, pure_noise_at_full_strength=inpainting is not None)
        options: dict[str, Any] = dict(
            guidance_scale=guidance_scale, inpainting=inpainting, step_hook=step_hook
        )
        predict = None if run is None else partial(run.predict, self.unet)
        with torch.no_grad():
            if run is None or not run.keeps_outside:
                return denoise(
                    self.unet,
                    solver,
                    latents,
                    positive,
                    negative,
                    generator=generator,
                    callback=callback,
                    predict=predict,
                    **options,
                )
            return self._sample_keeping_outside(
                run, solver, latents, positive, negative, generator, callback, predict, options
            )

    def _sample_keeping_outside(
        self,
        run: SamplingRun,
        solver: Solver,
        latents: Tensor,
        positive: Conditioning,
        negative: Conditioning | None,
        generator: torch.Generator,
        callback: StepCallback | None,
        predict: Callable[[Tensor], Tensor],
        options: dict[str, Any],
    ) -> Tensor:
        """Sample without the run's regions, then with them, holding the outside to the first trajectory.

        Both passes draw the same random numbers as a run without regions would (the generator's state is
        copied), so the latents outside every region end exactly as that run's. Progress counts both.
        """
        total = 2 * len(solver.inference_steps)
        base_generator = torch.Generator(generator.device)
        base_generator.set_state(generator.get_state())
        trajectory: list[Tensor] = []

        def record(done: int, _: int, current: Tensor) -> None:
            trajectory.append(current.clone())
            if callback is not None:
                callback(done, total, current)

        with run.without_regions():
            denoise(
                self.unet,
                deepcopy(solver),
                latents,
                positive,
                negative,
                generator=base_generator,
                callback=record,
                predict=predict,
                **options,
            )
        outside = outside_of_regions(run.regions, latents.shape[0]).to(latents)

        def hold_outside(index: int, current: Tensor) -> Tensor:
            return outside * trajectory[index] + (1 - outside) * current

        def report(done: int, _: int, current: Tensor) -> None:
            if callback is not None:
                callback(len(trajectory) + done, total, current)

        return denoise(
            self.unet,
            solver,
            latents,
            positive,
            negative,
            generator=generator,
            callback=report,
            predict=predict,
            after_step=hold_outside,
            **options,
        )

    def text_to_image(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int = 512,
        height: int = 512,
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        batch_size: int = 1,
        solver: str = "ddim",
        schedule: str = "normal",
        callback: StepCallback | None = None,
        size: SizeConditioning | None = None,
        negative_size: SizeConditioning | None = None,
        zero_empty_negative: bool = True,
    ) -> Tensor:
        """(B, 3, height, width) image in [0, 1]. SDXL options: see `encode_prompts`."""
        check_size(batch_size, height, width, "text_to_image")
        positive, negative = self.encode_prompts(
            prompt,
            negative_prompt,
            size or SizeConditioning.for_image(height, width),
            negative_size,
            zero_empty_negative,
            guidance_scale,
        )
        factor = self.autoencoder.config.downscale_factor
        shape = (batch_size, self.latent_channels, height // factor, width // factor)
        sampler = make_solver(
            solver, steps, schedule, prediction_type=self.prediction_type, device=self.device
        )
        latents = self.sample(shape, positive, negative, sampler, guidance_scale, seed, callback=callback)
        return self.decode_latents(latents)

    def image_to_image(
        self,
        image: Tensor,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 0.75,
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        solver: str = "ddim",
        schedule: str = "normal",
        callback: StepCallback | None = None,
        size: SizeConditioning | None = None,
        negative_size: SizeConditioning | None = None,
        zero_empty_negative: bool = True,
    ) -> Tensor:
        """Re-draw `image` ((B, 3, H, W) in [0, 1]) with `strength` of noise (1 = ignore it)."""
        height, width = image.shape[-2:]
        check_size(image.shape[0], height, width, "image_to_image")
        positive, negative = self.encode_prompts(
            prompt,
            negative_prompt,
            size or SizeConditioning.for_image(height, width),
            negative_size,
            zero_empty_negative,
            guidance_scale,
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = self.encode_image(image, generator=generator)  # a posterior sample, as diffusers' img2img
        sampler = make_solver(solver, steps, schedule, strength, self.prediction_type, device=self.device)
        result = self.sample(
            tuple(latents.shape),  # type: ignore[arg-type]
            positive,
            negative,
            sampler,
            guidance_scale,
            seed,
            latents,
            callback=callback,
            generator=generator,
        )
        return self.decode_latents(result)

    def inpaint(
        self,
        image: Tensor,
        mask: Tensor,
        prompt: str,
        negative_prompt: str = "",
        strength: float = 1.0,
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        solver: str = "ddim",
        schedule: str = "normal",
        callback: StepCallback | None = None,
        size: SizeConditioning | None = None,
        negative_size: SizeConditioning | None = None,
        zero_empty_negative: bool = True,
    ) -> Tensor:
        """Repaint where `mask` ((B, 1, H, W), 1 = repaint) is set; 9-channel models or latent blending."""
        height, width = image.shape[-2:]
        check_size(image.shape[0], height, width, "inpaint")
        positive, negative = self.encode_prompts(
            prompt,
            negative_prompt,
            size or SizeConditioning.for_image(height, width),
            negative_size,
            zero_empty_negative,
            guidance_scale,
        )
        generator = torch.Generator("cpu").manual_seed(seed)
        factor = self.autoencoder.config.downscale_factor
        shape = (image.shape[0], self.latent_channels, height // factor, width // factor)
        # diffusers' order of draws: source sample (when needed), initial noise, masked-image sample
        needs_source = not self.is_inpainting_model or strength < 1.0
        latents = self.encode_image(image, generator=generator) if needs_source else None
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        masked_image_latents = None
        if self.is_inpainting_model:
            keep = (mask < 0.5).to(image.dtype)
            masked_image = image * keep + 0.5 * (1 - keep)  # masked pixels gray (0 in [-1, 1]), as diffusers
            masked_image_latents = self.encode_image(masked_image, generator=generator)
        else:  # diffusers samples the masked image's latents even for a model that ignores them
            torch.randn(shape, generator=generator, dtype=self.autoencoder.dtype)
        latent_mask = torch.nn.functional.interpolate(mask.float(), size=shape[-2:], mode="nearest")
        sampler = make_solver(solver, steps, schedule, strength, self.prediction_type, device=self.device)
        result = self.sample(
            shape,
            positive,
            negative,
            sampler,
            guidance_scale,
            seed,
            latents,
            inpainting_mask=latent_mask,
            masked_image_latents=masked_image_latents,
            callback=callback,
            generator=generator,
            noise=noise,
        )
        return self.decode_latents(result)

    def encode_prompts(
        self,
        prompt: str,
        negative_prompt: str,
        size: SizeConditioning,
        negative_size: SizeConditioning | None = None,
        zero_empty_negative: bool = True,
        guidance_scale: float = 7.5,
    ) -> tuple[Conditioning, Conditioning | None]:
        """Positive and negative conditioning as diffusers' pipelines compute them (no negative without guidance).

        SDXL: `size` gives the time ids, `negative_size` the negative's (default: the same); with
        `zero_empty_negative` (diffusers' `force_zeros_for_empty_prompt`, on for SDXL base) an empty
        negative prompt is all zeros instead of the encoded empty text. SD1.5 ignores these options.
        """
        positive = self.encode_prompt(prompt, size=size)
        if guidance_scale <= 1.0:
            return positive, None
        negative_size = negative_size or size
        if self.is_sdxl and zero_empty_negative and negative_prompt == "":
            return positive, self.zero_conditioning(positive, negative_size)
        return positive, self.encode_prompt(negative_prompt, size=negative_size)


def _overflowed(autoencoder: LatentDiffusionAutoencoder, result: Tensor) -> bool:
    """Whether an fp16 autoencoder's result holds NaN or inf (fp16 tops out at 65504)."""
    return autoencoder.dtype == torch.float16 and not bool(result.isfinite().all())


def _float32_copy(autoencoder: LatentDiffusionAutoencoder) -> LatentDiffusionAutoencoder:
    """A float32 autoencoder on the same device with the same weights, built on meta: no random init."""
    copy = LatentDiffusionAutoencoder(autoencoder.config, device="meta")
    weights = {key: value.float() for key, value in autoencoder.state_dict().items()}
    copy.load_state_dict(weights, assign=True)
    return copy
