"""Stable Diffusion 1.5 / SDXL: the models of one checkpoint (UNet, autoencoder, text encoder(s)).

SDXL follows diffusers' `StableDiffusionXL*Pipeline`s: time ids from `SizeConditioning` (default: the
output size, no crop; the negative's the same unless given), an empty negative prompt as all zeros
(`force_zeros_for_empty_prompt`, optional), and an fp16 autoencoder that overflows retried in fp32.
`StableDiffusion.from_checkpoint` builds either family from a single file or a diffusers folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..clip.config import CLIPTextConfig
from ..clip.prompt_encoding import encode_sd15_prompt, encode_sdxl_prompt
from ..clip.prompt_weighting import EmbeddingLookup
from ..clip.text_encoder import CLIPTextEncoder
from . import pipelines
from .adapters.regional import sample_keeping_outside
from .auto_encoder import LatentDiffusionAutoencoder, decode_retrying_in_float32, encode_retrying_in_float32
from .checkpoint import CheckpointError, ComponentPlacement, load_checkpoint
from .limits import check_size
from .model_patch import SamplingRun
from .sampling import (
    Conditioning,
    InpaintingInputs,
    PromptConditioning,
    SizeConditioning,
    StepCallback,
    denoise,
    entries_of,
    prepare_latents,
)
from .solvers import PredictionType, Solver, make_solver
from .tiling import TiledPrediction, TileLayout
from .unet import UNet


@dataclass
class StableDiffusion:
    """The models of one checkpoint: prompt encoding, VAE encode/decode and the shared sampling path.

    The pipelines (`pipelines.py`) are bound as methods: `text_to_image`, `image_to_image`, `inpaint`.
    """

    unet: UNet
    autoencoder: LatentDiffusionAutoencoder
    text_encoder: CLIPTextEncoder
    text_encoder_2: CLIPTextEncoder | None = None
    prediction_type: PredictionType = PredictionType.EPSILON
    """What the UNet predicts (the checkpoint's markers or scheduler config say; `with_sampling` overrides)."""
    embeddings: EmbeddingLookup | None = field(default=None, repr=False)
    embeddings_2: EmbeddingLookup | None = field(default=None, repr=False)
    zero_terminal_snr: bool = False
    """Whether the UNet was trained on a zero-terminal-SNR noise schedule (diffusers' rescale_betas_zero_snr)."""

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        text_encoder_configs: Mapping[str, CLIPTextConfig] | None = None,
        placement: ComponentPlacement | None = None,
    ) -> StableDiffusion:
        """The models of an SD1.5 or SDXL single file or diffusers folder (see `checkpoint.load_checkpoint`);
        `placement` gives parts ("unet", "autoencoder", "text_encoders") their own device and dtype."""
        checkpoint = load_checkpoint(
            path, device, dtype, text_encoder_configs=text_encoder_configs, placement=placement
        )
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
            prediction_type=checkpoint.prediction_type,
            zero_terminal_snr=checkpoint.zero_terminal_snr,
        )

    def with_sampling(
        self, prediction_type: PredictionType | str | None = None, zero_terminal_snr: bool | None = None
    ) -> StableDiffusion:
        """The same models (shared, not copied) sampled as `prediction_type` / with `zero_terminal_snr`.

        `self` is unchanged: ComfyUI branches that share a loaded model may sample it differently.
        """
        return replace(
            self,
            prediction_type=self.prediction_type
            if prediction_type is None
            else PredictionType(prediction_type),
            zero_terminal_snr=self.zero_terminal_snr if zero_terminal_snr is None else zero_terminal_snr,
        )

    def make_solver(
        self, name: str, steps: int, schedule: str = "normal", denoise_strength: float = 1.0
    ) -> Solver:
        """A solver by name for this model: its prediction type, noise schedule, device (and AYS table)."""
        return make_solver(
            name,
            steps,
            schedule,
            denoise_strength,
            self.prediction_type,
            device=self.device,
            zero_terminal_snr=self.zero_terminal_snr,
            sdxl=self.is_sdxl,
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
        """(B, 3, H, W) in [0, 1] -> scaled latents; an fp16 autoencoder that overflows is retried in fp32."""
        return encode_retrying_in_float32(self.autoencoder, image, generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Scaled latents -> (B, 3, H, W) in [0, 1]; an fp16 autoencoder that overflows is retried in fp32."""
        return decode_retrying_in_float32(self.autoencoder, latents)

    def sample(
        self,
        latents_shape: tuple[int, int, int, int],
        positive: PromptConditioning,
        negative: PromptConditioning | None,
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
        tiling: TileLayout | None = None,
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

        `positive` / `negative` may be lists of `ConditioningEntry`s (areas, masks, strengths, noise windows),
        combined as ComfyUI combines a CONDITIONING list. Areas crop the UNet's input, which masked adapters
        (regions) cannot follow: that pairing is refused.

        `tiling`: MultiDiffusion (`tiling.py`), the model evaluated on overlapping tiles averaged at each step;
        the run announces each tile (`SamplingRun.set_window`) so ControlNet hints are cropped to it. Without it,
        the run's `tiling` (a `TiledDiffusionPatch` on the stack) if any.
        """
        if tiling is None and run is not None:
            tiling = run.tiling  # a `TiledDiffusionPatch` on the model's stack
        if tiling is not None and run is not None and run.regions:
            raise ValueError(
                "tiled sampling cannot be combined with masked adapters on the model (regional LoRA, IP-Adapter "
                "with a mask): give each region its own prompt with conditioning masks (Conditioning Set Mask), "
                "or use the adapters without masks"
            )
        if run is not None and run.regions:
            cropping = [
                entry
                for prompt in (positive, negative)
                if prompt is not None
                for entry in entries_of(prompt)
                if entry.area is not None or entry.area_fraction is not None or entry.area_from_mask
            ]
            if cropping:
                raise ValueError(
                    "conditioning with an area (Conditioning Set Area, or Set Mask with mask bounds) cannot be "
                    "combined with masked adapters on the model (regional LoRA, IP-Adapter with a mask): use "
                    "conditioning masks without bounds, or the adapters without masks"
                )
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
            guidance_scale=guidance_scale,
            inpainting=inpainting,
            step_hook=step_hook,
            guidance=None if run is None else run.guidance_stack(),
        )
        if tiling is not None:
            options["tiles"] = TiledPrediction(
                tiling, latents.shape[-2], latents.shape[-1], None if run is None else run.set_window
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
            return sample_keeping_outside(
                self.unet, run, solver, latents, positive, negative, generator, callback, predict, options
            )

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

    text_to_image = pipelines.text_to_image
    image_to_image = pipelines.image_to_image
    inpaint = pipelines.inpaint
