"""Text-to-image on our pipeline's path with a stack of patches (guidance adapters) applied for the run.

`guided_text_to_image` is `StableDiffusion.text_to_image` with a `SamplingRun` and `patched(...)` around the
sampling, as the sampler node runs it: what the guidance tests compare with diffusers' pipelines.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from foundationals.latent_diffusion.model_patch import ModelPatch, SamplingRun, patched
from foundationals.latent_diffusion.sampling import SizeConditioning
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion


class CountingUNet:
    """Counts the UNet calls (and batch items) of a run by wrapping `unet.forward`; restore with `close()`."""

    def __init__(self, sd: StableDiffusion) -> None:
        self.unet = sd.unet
        self.calls: list[int] = []
        original = self.unet.forward

        def counted(*args: torch.Tensor) -> torch.Tensor:
            self.calls.append(int(args[0].shape[0]))
            return original(*args)

        self.unet.forward = counted  # type: ignore[method-assign]

    def close(self) -> None:
        del self.unet.forward  # back to the class's method

    def __enter__(self) -> CountingUNet:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def guided_text_to_image(
    sd: StableDiffusion,
    patches: Sequence[ModelPatch],
    prompt: str,
    negative_prompt: str = "",
    width: int = 32,
    height: int = 32,
    steps: int = 6,
    guidance_scale: float = 6.0,
    seed: int = 0,
    solver: str = "ddim",
    schedule: str = "normal",
    decode: bool = True,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """(1, 3, height, width) in [0, 1] (or the latents with `decode=False`), as `text_to_image` plus `patches`."""
    positive, negative = sd.encode_prompts(
        prompt, negative_prompt, SizeConditioning.for_image(height, width), guidance_scale=guidance_scale
    )
    sampler = make_solver(solver, steps, schedule, 1.0, sd.prediction_type, device=sd.device)
    factor = sd.autoencoder.config.downscale_factor
    shape = (1, sd.latent_channels, height // factor, width // factor)
    run = SamplingRun(
        num_steps=steps,
        first_step=0,
        latent_height=shape[2],
        latent_width=shape[3],
        batch_size=1,
        uses_guidance=guidance_scale > 1.0,
    )
    with patched(sd, patches, run):
        latents = sd.sample(
            shape, positive, negative, sampler, guidance_scale, seed, callback=callback, run=run
        )
    return sd.decode_latents(latents) if decode else latents
