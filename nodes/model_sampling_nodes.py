"""How a model is sampled: its prediction type and zero-terminal-SNR noise schedule, set per model wire."""

from __future__ import annotations

from dataclasses import replace

from ..foundationals.latent_diffusion.solvers import PredictionType
from .wires import MODEL, ModelWire

SAMPLING_CHOICES: dict[str, PredictionType] = {
    "eps": PredictionType.EPSILON,
    "v_prediction": PredictionType.V_PREDICTION,
    "x0": PredictionType.SAMPLE,
}
"""ComfyUI's ModelSamplingDiscrete names for what the UNet predicts: the noise, v, or the clean latents."""


class FluxionModelSamplingDiscrete:
    """Sample a model as v-prediction / epsilon / x0, with or without zero terminal SNR (ComfyUI's
    ModelSamplingDiscrete for Fluxion models)."""

    DESCRIPTION = (
        "Sets what the model predicts and its noise schedule, for checkpoints whose file does not say it "
        "(v-prediction and zero-terminal-SNR fine-tunes without the v_pred / ztsnr marker keys). Returns a new "
        "model wire sharing the same weights; the input model is unchanged, so other branches keep sampling "
        "it as before. Use a trailing schedule with zsnr, as the zero-terminal-SNR paper recommends."
    )
    CATEGORY = "fluxion/advanced"
    FUNCTION = "patch"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The same model (and adapter stack) sampled with the chosen prediction type.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model (and its adapter stack) to sample differently."}),
                "sampling": (
                    list(SAMPLING_CHOICES),
                    {
                        "default": "eps",
                        "tooltip": "What the UNet predicts: eps (the noise, most SD1.5/SDXL checkpoints), "
                        "v_prediction (v-prediction fine-tunes), x0 (the clean latents).",
                    },
                ),
                "zsnr": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Zero terminal SNR: the noise schedule is rescaled so its last step is pure "
                        "noise, as the model was trained (diffusers' rescale_betas_zero_snr).",
                    },
                ),
            }
        }

    def patch(self, model: ModelWire, sampling: str, zsnr: bool) -> tuple[ModelWire]:
        if sampling not in SAMPLING_CHOICES:
            raise ValueError(
                f"Fluxion Model Sampling: sampling {sampling!r} is none of {', '.join(SAMPLING_CHOICES)}"
            )
        sampled = model.model.with_sampling(SAMPLING_CHOICES[sampling], bool(zsnr))
        return (replace(model, model=sampled),)


NODE_CLASS_MAPPINGS = {"FluxionModelSamplingDiscrete": FluxionModelSamplingDiscrete}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionModelSamplingDiscrete": "Fluxion Model Sampling (Discrete)"}
