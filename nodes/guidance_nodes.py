"""Guidance nodes: FreeU / FreeU v2, perturbed-attention and self-attention guidance, rescaled CFG, CFG cutoff.

Each takes a model wire and returns a new one with the guidance at the end of its adapter stack (the input wire
is left as it was, so branches stay independent); the sampler applies it for its run and removes it after.
They follow ComfyUI's nodes of the same names (defaults and ranges), with the diffusers variants as options.
"""

from __future__ import annotations

from ..foundationals.latent_diffusion.adapters.guidance import (
    FREEU_RULES,
    RESCALE_SPACES,
    CFGCutoffPatch,
    FreeUPatch,
    PAGPatch,
    RescaleCFGPatch,
    SAGPatch,
    match_self_attention_blocks,
)
from .wires import MODEL, ModelWire

CATEGORY = "fluxion/guidance"
_MODEL_INPUT = (MODEL, {"tooltip": "The model to add the guidance to (its other adapters are kept)."})
_MODEL_OUTPUT = ("The model with this guidance at the end of its adapter stack.",)
_RULE_TOOLTIP = (
    "Which decoder blocks get (b1, s1) and (b2, s2): channels = by the width of the block's input (the FreeU "
    "authors' code and ComfyUI's node); up_blocks = by decoder level (diffusers' enable_freeu)."
)


def _float(
    default: float, minimum: float, maximum: float, step: float, tooltip: str, **extra: float
) -> tuple:
    """A FLOAT widget."""
    return (
        "FLOAT",
        {"default": default, "min": minimum, "max": maximum, "step": step, **extra, "tooltip": tooltip},
    )


class _GuidanceNode:
    """What every guidance node shares: MODEL in (first input), MODEL out with the guidance appended."""

    CATEGORY = CATEGORY
    FUNCTION = "apply"
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = _MODEL_OUTPUT

    @staticmethod
    def model_inputs(**inputs: tuple) -> dict:
        """INPUT_TYPES: the model, then `inputs` in order (their order is the saved workflows' widget order)."""
        return {"required": {"model": _MODEL_INPUT, **inputs}}


def _freeu_inputs(b1: float, b2: float) -> dict:
    return _GuidanceNode.model_inputs(
        b1=_float(b1, 0.0, 10.0, 0.01, "Backbone factor of the deepest decoder stage (> 1 amplifies)."),
        b2=_float(b2, 0.0, 10.0, 0.01, "Backbone factor of the next decoder stage."),
        s1=_float(
            0.9,
            0.0,
            10.0,
            0.01,
            "Skip factor of the deepest stage: scales the skip's low frequencies (< 1 damps).",
        ),
        s2=_float(0.2, 0.0, 10.0, 0.01, "Skip factor of the next stage."),
        blocks=(list(FREEU_RULES), {"default": "channels", "tooltip": _RULE_TOOLTIP}),
    )


class FluxionFreeU(_GuidanceNode):
    """FreeU: amplify the decoder's backbone features and damp its skip connections' low frequencies."""

    DESCRIPTION = (
        "FreeU (Si et al. 2023): in the UNet's decoder, the first half of each block's backbone channels is "
        "multiplied by b, and the low frequencies of its skip connection by s. No extra UNet pass. As ComfyUI's "
        "FreeU node (blocks = channels) or diffusers' enable_freeu (blocks = up_blocks)."
    )
    VERSION = 1

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _freeu_inputs(1.1, 1.2)

    def apply(
        self, model: ModelWire, b1: float, b2: float, s1: float, s2: float, blocks: str = "channels"
    ) -> tuple[ModelWire]:
        return (model.with_patch(FreeUPatch(b1, b2, s1, s2, version=self.VERSION, rule=blocks)),)


class FluxionFreeUV2(FluxionFreeU):
    """FreeU v2: the backbone factor is weighed by each position's normalized channel mean."""

    DESCRIPTION = (
        "FreeU v2: as FreeU, but the backbone factor acts in proportion to each position's channel mean "
        "(normalized to 0..1 per image): 1 + (b - 1) x mean. As ComfyUI's FreeU_V2 node. No extra UNet pass."
    )
    VERSION = 2

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return _freeu_inputs(1.3, 1.4)


class FluxionPerturbedAttentionGuidance(_GuidanceNode):
    """Perturbed-attention guidance: steer away from a pass whose self-attention maps are the identity."""

    DESCRIPTION = (
        "Perturbed-attention guidance (PAG, Ahn et al. 2024): each step runs one more UNet pass on the positive "
        "prompt with the chosen self-attention layers replaced by the identity, and adds scale x (prediction - "
        "perturbed prediction). Costs one extra UNet pass (of half the CFG batch) per step. layers = 'mid' is "
        "what ComfyUI's PerturbedAttentionGuidance perturbs; other layers as diffusers' pag_applied_layers."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.model_inputs(
            scale=_float(3.0, 0.0, 100.0, 0.01, "Guidance strength (0 = off, no extra pass).", round=0.01),
            layers=(
                "STRING",
                {
                    "default": "mid",
                    "tooltip": "Comma-separated diffusers layer names or regular expressions, e.g. 'mid', "
                    "'down_blocks.2', 'up_blocks.0.attentions.1': every self-attention whose name matches.",
                },
            ),
            adaptive_scale=_float(
                0.0,
                0.0,
                1.0,
                0.0001,
                "diffusers' pag_adaptive_scale: the scale decays as max(0, scale - adaptive x (1000 - t)); 0 "
                "keeps it constant.",
                round=0.0001,
            ),
        )

    def apply(
        self, model: ModelWire, scale: float, layers: str, adaptive_scale: float = 0.0
    ) -> tuple[ModelWire]:
        patterns = [part.strip() for part in layers.split(",") if part.strip()]
        if not patterns:
            raise ValueError("Fluxion Perturbed-Attention Guidance: 'layers' is empty (e.g. 'mid')")
        try:
            match_self_attention_blocks(model.model.unet, patterns)
        except ValueError as error:
            raise ValueError(f"Fluxion Perturbed-Attention Guidance, input 'layers': {error}") from error
        return (model.with_patch(PAGPatch(scale, patterns, adaptive_scale)),)


class FluxionSelfAttentionGuidance(_GuidanceNode):
    """Self-attention guidance: steer away from a prediction blurred where the self-attention concentrates."""

    DESCRIPTION = (
        "Self-attention guidance (SAG, Hong et al. 2023), SD1.5 and SDXL: the middle block's self-attention map "
        "marks the salient regions; the predicted image is blurred there, noised back and run through the UNet "
        "once more (negative prompt), and scale x (prediction - degraded prediction) is added. Costs one extra "
        "UNet pass (of half the CFG batch) per step. Defaults are ComfyUI's; diffusers uses blur_sigma 1."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.model_inputs(
            scale=_float(0.5, -2.0, 5.0, 0.01, "Guidance strength (0 = off, no extra pass)."),
            blur_sigma=_float(
                2.0, 0.1, 10.0, 0.1, "Sigma of the Gaussian blur (9 taps) of the degraded prediction."
            ),
        )

    def apply(self, model: ModelWire, scale: float, blur_sigma: float) -> tuple[ModelWire]:
        return (model.with_patch(SAGPatch(scale, blur_sigma)),)


class FluxionRescaleCFG(_GuidanceNode):
    """Rescaled classifier-free guidance: bring the guided prediction back to the conditional one's spread."""

    DESCRIPTION = (
        "Rescaled CFG (Lin et al. 2023): the guided prediction is rescaled to the standard deviation of the "
        "positive one and mixed back by multiplier, against over-saturation at high CFG. space = v is ComfyUI's "
        "RescaleCFG (in v space, before PAG/SAG terms); model_output is diffusers' guidance_rescale (on the "
        "UNet's output, after them). No extra UNet pass."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.model_inputs(
            multiplier=_float(
                0.7, 0.0, 1.0, 0.01, "How much of the rescaled prediction to use (0 = plain CFG)."
            ),
            space=(
                list(reversed(RESCALE_SPACES)),
                {
                    "default": "v",
                    "tooltip": "v: ComfyUI's RescaleCFG; model_output: diffusers' guidance_rescale.",
                },
            ),
        )

    def apply(self, model: ModelWire, multiplier: float, space: str = "v") -> tuple[ModelWire]:
        return (model.with_patch(RescaleCFGPatch(multiplier, space)),)


class FluxionCFGCutoff(_GuidanceNode):
    """CFG cutoff: stop classifier-free guidance (and its negative UNet batch) after a fraction of the steps."""

    DESCRIPTION = (
        "Stops classifier-free guidance after a fraction of the steps, as diffusers' CFG-cutoff callback: steps "
        "0 .. int(cutoff x steps) use CFG, the later ones run the positive prompt alone (half the UNet batch, "
        "about half the cost of those steps)."
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return cls.model_inputs(
            cutoff=_float(
                0.4, 0.0, 1.0, 0.01, "Fraction of the steps after which guidance stops (1 = never)."
            )
        )

    def apply(self, model: ModelWire, cutoff: float) -> tuple[ModelWire]:
        return (model.with_patch(CFGCutoffPatch(cutoff)),)


NODE_CLASS_MAPPINGS = {
    "FluxionFreeU": FluxionFreeU,
    "FluxionFreeUV2": FluxionFreeUV2,
    "FluxionPerturbedAttentionGuidance": FluxionPerturbedAttentionGuidance,
    "FluxionSelfAttentionGuidance": FluxionSelfAttentionGuidance,
    "FluxionRescaleCFG": FluxionRescaleCFG,
    "FluxionCFGCutoff": FluxionCFGCutoff,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionFreeU": "Fluxion FreeU",
    "FluxionFreeUV2": "Fluxion FreeU V2",
    "FluxionPerturbedAttentionGuidance": "Fluxion Perturbed-Attention Guidance",
    "FluxionSelfAttentionGuidance": "Fluxion Self-Attention Guidance",
    "FluxionRescaleCFG": "Fluxion Rescale CFG",
    "FluxionCFGCutoff": "Fluxion CFG Cutoff",
}
