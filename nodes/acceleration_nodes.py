"""Training-free accelerations, opt-in: DeepCache, token merging (ToMe for SD), and the torch.compile path.

Each takes a model wire and returns a new one with the acceleration at the end of its adapter stack (the input
wire is left as it was, so branches stay independent); the sampler applies it for its run and removes it after.
"""

from __future__ import annotations

from ..foundationals.latent_diffusion.adapters.deep_cache import DeepCachePatch
from ..foundationals.latent_diffusion.adapters.token_merging import TokenMergingPatch
from ..foundationals.latent_diffusion.compile_patch import COMPILE_BACKENDS, CompilePatch
from .wires import MODEL, ModelWire

CATEGORY = "fluxion/speed"
_MODEL_INPUT = (MODEL, {"tooltip": "The model to accelerate (its other adapters are kept)."})
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.01}


class FluxionDeepCache:
    """DeepCache: full UNet every few steps, only its shallow branch (with cached deep features) in between."""

    DESCRIPTION = (
        "DeepCache (Ma et al. 2023): the UNet runs in full every cache_interval steps and keeps its deep "
        "features; the steps in between run only the shallow branch (the first cache_depth + 1 input blocks and "
        "the matching last output blocks) on the kept features. Faster, approximate: cache_interval 1 is the "
        "exact model. The cache lives for one sampling run."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with DeepCache at the end of its adapter stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": _MODEL_INPUT,
                "cache_interval": (
                    "INT",
                    {
                        "default": 3,
                        "min": 1,
                        "max": 100,
                        "tooltip": "Run the full UNet every this many steps (1 = every step: no caching).",
                    },
                ),
                "cache_depth": (
                    "INT",
                    {
                        "default": 1,
                        "min": 0,
                        "max": 10,
                        "tooltip": (
                            "Shallow branch: input blocks 0..depth and the matching output blocks run every "
                            "step. 1 = DeepCache's default for SD1.5 (in the first down / last up block); "
                            "larger is closer to exact and slower. SD1.5 and SDXL accept 0..10 / 0..7."
                        ),
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    dict(_PERCENT, default=0.0, tooltip="Caching starts at this fraction of the steps."),
                ),
                "end_percent": (
                    "FLOAT",
                    dict(_PERCENT, default=1.0, tooltip="Caching stops at this fraction of the steps."),
                ),
            }
        }

    def apply(
        self,
        model: ModelWire,
        cache_interval: int,
        cache_depth: int,
        start_percent: float,
        end_percent: float,
    ) -> tuple[ModelWire]:
        return (model.with_patch(DeepCachePatch(cache_interval, cache_depth, start_percent, end_percent)),)


class FluxionTokenMerging:
    """ToMe for SD: merge similar query tokens in the full-resolution self-attentions (ComfyUI's TomePatchModel)."""

    DESCRIPTION = (
        "Token merging (ToMe for SD, Bolya & Hoffman 2023), as ComfyUI's TomePatchModel: in the self-attention of "
        "the transformer blocks at the latent's own resolution, ratio of the query tokens are merged into similar "
        "ones (one random destination per 2x2 cell) and unmerged after the attention. Faster at large sizes, "
        "approximate; ratio 0 is the exact model. SDXL has no transformer there: no effect (as in ComfyUI)."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with token merging at the end of its adapter stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": _MODEL_INPUT,
                "ratio": (
                    "FLOAT",
                    dict(_PERCENT, default=0.3, tooltip="Fraction of the tokens merged (0 = none, exact)."),
                ),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 0xFFFFFFFFFFFFFFFF,
                        "tooltip": "Seed of the random destination choice (a fresh generator each run).",
                    },
                ),
            }
        }

    def apply(self, model: ModelWire, ratio: float, seed: int = 0) -> tuple[ModelWire]:
        return (model.with_patch(TokenMergingPatch(ratio, seed)),)


class FluxionCompile:
    """torch.compile of the UNet's heavy blocks for the runs of the returned model."""

    DESCRIPTION = (
        "Opt-in torch.compile of the UNet's ResNet blocks and spatial transformers (regional compilation) for the "
        "runs of this model; other branches stay eager. The first run compiles (minutes on a CPU with inductor); "
        "later runs reuse the graphs. Adapters added or removed later make the touched blocks recompile (or run "
        "eagerly past dynamo's recompile limit): the output is never stale."
    )
    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with the compile patch in its adapter stack.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": _MODEL_INPUT,
                "backend": (
                    list(COMPILE_BACKENDS),
                    {
                        "default": "inductor",
                        "tooltip": (
                            "inductor: generated kernels (needs a C++ compiler on CPU); aot_eager / eager: "
                            "dynamo graphs without code generation (for checking, no speed-up)."
                        ),
                    },
                ),
                "mode": (
                    ["default", "reduce-overhead", "max-autotune"],
                    {"default": "default", "tooltip": "torch.compile mode (inductor only)."},
                ),
            }
        }

    def apply(self, model: ModelWire, backend: str, mode: str = "default") -> tuple[ModelWire]:
        return (model.with_patch(CompilePatch(backend, None if backend != "inductor" else mode)),)


NODE_CLASS_MAPPINGS = {
    "FluxionDeepCache": FluxionDeepCache,
    "FluxionTokenMerging": FluxionTokenMerging,
    "FluxionCompile": FluxionCompile,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionDeepCache": "Fluxion DeepCache",
    "FluxionTokenMerging": "Fluxion Token Merging (ToMe)",
    "FluxionCompile": "Fluxion Compile (torch.compile)",
}
