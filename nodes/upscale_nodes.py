"""Upscaling: MultiDiffusion tiled sampling (a model patch) and hires fix (upscale, then a second sampling pass).

"Fluxion Tiled Diffusion" returns the model with a `TiledDiffusionPatch` at the end of its adapter stack: the
sampler then evaluates the model on overlapping tiles of the latent and blends their predictions at every step
(`foundationals/latent_diffusion/tiling.py`), so images larger than the model's native size keep its detail.
ControlNet hints over the whole image are cut per tile (ControlNet tile upscaling), LoRAs and IP-Adapter act on
every tile, conditioning masks and areas are cut per tile (regions with their own prompts).

"Fluxion Hires Fix" is core's LatentUpscaleBy followed by a Fluxion Sampler pass with its own steps and denoise,
in one node (the same result as that two-node chain: the node calls the same code). Give it a tiled model to
upscale beyond the model's native size.
"""

from __future__ import annotations

from typing import Any

import torch

from ..foundationals.latent_diffusion.limits import MAX_RESOLUTION
from ..foundationals.latent_diffusion.solvers import SCHEDULES, SOLVERS
from ..foundationals.latent_diffusion.tiling import BLENDS, TiledDiffusionPatch, TileLayout
from .host import ProgressReporter
from .sampler_nodes import FluxionSampler, sample_latents
from .wires import MODEL, ModelWire

CATEGORY = "fluxion/upscale"
LATENT_UPSCALE_METHODS = ["nearest-exact", "bilinear", "area", "bicubic"]
"""Core LatentUpscaleBy's methods that are plain `torch.nn.functional.interpolate` modes (not bislerp)."""


class FluxionTiledDiffusion:
    """MultiDiffusion: the model evaluated on overlapping tiles blended at every step."""

    DESCRIPTION = (
        "Tiled sampling (MultiDiffusion, Bar-Tal et al. 2023, as diffusers' panorama pipeline): at every step the "
        "latent is cut into overlapping tiles of tile_width x tile_height pixels, the model (with guidance and its "
        "adapters) runs on each tile and the tiles' predictions are averaged where they overlap. For images larger "
        "than the model's native size: generate or upscale (Fluxion Hires Fix, img2img) with this model. A "
        "ControlNet hint over the whole image is cut per tile; conditioning masks and areas give regions their own "
        "prompts. Costs one UNet pass per tile per step. Masked adapters (regional LoRA, masked IP-Adapter) and "
        "T2I-Adapters are refused."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model sampling in tiles (its other adapters are kept).",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        size = {"min": 64, "max": MAX_RESOLUTION, "step": 8}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to sample in tiles (its adapter stack is kept)."}),
                "tile_width": (
                    "INT",
                    dict(
                        size,
                        default=512,
                        tooltip="Tile width in pixels: the model's native size (512 for SD1.5, 1024 for SDXL).",
                    ),
                ),
                "tile_height": ("INT", dict(size, default=512, tooltip="Tile height in pixels.")),
                "overlap": (
                    "INT",
                    {
                        "default": 128,
                        "min": 0,
                        "max": MAX_RESOLUTION,
                        "step": 8,
                        "tooltip": "Pixels shared by neighbouring tiles (smaller than the tile); more overlap hides "
                        "the seams better and costs more tiles.",
                    },
                ),
                "blend": (
                    list(BLENDS),
                    {
                        "default": "uniform",
                        "tooltip": "uniform: tiles averaged equally (MultiDiffusion, diffusers); gaussian: each tile "
                        "weighed by a bump centred on it (Mixture of Diffusers), feathering the seams.",
                    },
                ),
            }
        }

    def apply(
        self, model: ModelWire, tile_width: int, tile_height: int, overlap: int, blend: str = "uniform"
    ) -> tuple[ModelWire]:
        if any(isinstance(patch, TiledDiffusionPatch) for patch in model.patches):
            raise ValueError(
                f"the model {model.name} already samples in tiles (Fluxion Tiled Diffusion): keep one"
            )
        factor = model.model.autoencoder.config.downscale_factor
        try:
            layout = TileLayout.from_pixels(tile_width, tile_height, overlap, factor, blend)  # type: ignore[arg-type]
        except ValueError as error:
            raise ValueError(f"Fluxion Tiled Diffusion: {error}") from error
        return (model.with_patch(TiledDiffusionPatch(layout)),)


def upscale_latent(latent: dict[str, Any], method: str, scale_by: float) -> dict[str, Any]:
    """Core LatentUpscaleBy: the samples resized by `scale_by` (rounded per side), the other keys kept."""
    if method not in LATENT_UPSCALE_METHODS:
        raise ValueError(
            f"unknown latent upscale method {method!r}; choose one of {', '.join(LATENT_UPSCALE_METHODS)}"
        )
    if not scale_by > 0:
        raise ValueError(f"scale_by must be more than 0, got {scale_by}")
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor) or samples.dim() != 4:
        raise ValueError(
            f"the latent to upscale must be a LATENT with (B, C, h, w) samples, got {latent!r:.80}"
        )
    height, width = round(samples.shape[-2] * scale_by), round(samples.shape[-1] * scale_by)
    if height < 1 or width < 1:
        raise ValueError(
            f"scale_by {scale_by} leaves no latent cell of the {tuple(samples.shape[-2:])} latent"
        )
    resized = torch.nn.functional.interpolate(samples, size=(height, width), mode=method)
    return {**latent, "samples": resized}


class FluxionHiresFix:
    """Hires fix: upscale the latent, then sample it again with its own steps and denoise."""

    DESCRIPTION = (
        "Hires fix in one node: the latent is upscaled by scale_by (as core's Upscale Latent By) and sampled again "
        "from partial noise (denoise) with its own steps, seed and solver, as a Fluxion Sampler would. The same as "
        "the chain Upscale Latent By -> Fluxion Sampler. For an image upscale instead, chain VAE Decode -> Upscale "
        "Image By -> VAE Encode -> Fluxion Sampler. Use a tiled model (Fluxion Tiled Diffusion) beyond the model's "
        "native size."
    )
    CATEGORY = CATEGORY
    FUNCTION = "upscale"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    OUTPUT_TOOLTIPS = ("The upscaled and re-sampled LATENT, for Fluxion or core VAE Decode.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        sampler = FluxionSampler.INPUT_TYPES()["required"]
        return {
            "required": {
                "model": (
                    MODEL,
                    {"tooltip": "The model (and adapter stack) of the second pass; tiled or not."},
                ),
                "positive": sampler["positive"],
                "negative": sampler["negative"],
                "latent": (
                    "LATENT",
                    {"tooltip": "The first pass's LATENT (e.g. a Fluxion Sampler's output)."},
                ),
                "scale_by": (
                    "FLOAT",
                    {
                        "default": 1.5,
                        "min": 0.01,
                        "max": 8.0,
                        "step": 0.01,
                        "tooltip": "Upscale factor of each side (rounded to whole latent cells).",
                    },
                ),
                "upscale_method": (
                    LATENT_UPSCALE_METHODS,
                    {
                        "default": "nearest-exact",
                        "tooltip": "How the latent is resized (core's Upscale Latent By).",
                    },
                ),
                "seed": sampler["seed"],
                "steps": (
                    "INT",
                    {
                        "default": 20,
                        "min": 1,
                        "max": 1000,
                        "tooltip": "Steps of the full schedule; the pass runs the last denoise x steps of them.",
                    },
                ),
                "cfg": sampler["cfg"],
                "solver": sampler["solver"],
                "schedule": sampler["schedule"],
                "denoise": (
                    "FLOAT",
                    {
                        "default": 0.5,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "tooltip": "How much the second pass redraws: 0.3-0.6 adds detail and keeps the composition.",
                    },
                ),
            }
        }

    def upscale(
        self,
        model: ModelWire,
        positive: Any,
        negative: Any,
        latent: dict[str, Any],
        scale_by: float,
        upscale_method: str,
        seed: int,
        steps: int,
        cfg: float,
        solver: str,
        schedule: str,
        denoise: float,
    ) -> tuple[dict[str, Any]]:
        if solver not in SOLVERS or schedule not in SCHEDULES:
            raise ValueError(f"unknown solver {solver!r} or schedule {schedule!r}")
        upscaled = upscale_latent(latent, upscale_method, scale_by)
        with ProgressReporter(steps, "Fluxion hires fix") as progress:
            samples = sample_latents(
                model, positive, negative, upscaled, seed, steps, cfg, solver, schedule, denoise, progress
            )
        return ({**upscaled, "samples": samples},)


NODE_CLASS_MAPPINGS = {"FluxionTiledDiffusion": FluxionTiledDiffusion, "FluxionHiresFix": FluxionHiresFix}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionTiledDiffusion": "Fluxion Tiled Diffusion",
    "FluxionHiresFix": "Fluxion Hires Fix",
}
