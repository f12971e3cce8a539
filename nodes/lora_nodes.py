"""Wire a LoRA (kohya/A1111, diffusers/peft, LyCORIS LoHa/LoKr, DoRA) onto a model and its text encoders."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from ..foundationals.conversion.lora_keys import LoraFile, normalize_lora
from ..foundationals.latent_diffusion.controlnet import describe_model_kind
from ..foundationals.latent_diffusion.lora import LoraMismatchError, SDLoraManager, model_family
from ..foundationals.latent_diffusion.model_patch import SamplingRun, Undo
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from ..foundationals.model_files import ModelFileError, describe_keys, read_metadata, read_state_dict
from .host import list_model_files, model_file_path
from .wires import CLIP, MODEL, ClipWire, ModelWire

UNET = "unet"
NOT_LORAS = ("a ControlNet", "a T2I-Adapter", "an IP-Adapter", "a Stable Diffusion checkpoint")
LORA_EXPECTED = (
    "a LoRA (kohya/A1111 lora_unet_*/lora_te*_* keys, diffusers/peft *.lora_A/lora_B or *.lora.down/up keys)"
)
_CONTEXT_FAMILIES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}


def check_lora_family(lora_name: str, lora: LoraFile, model: ModelWire) -> None:
    """Refuse a LoRA made for another base model, even when some of its layers would happen to fit.

    Evidence: what the file says (lora_te2_ keys, added embeddings, a real model's context width) and the
    input width of its cross-attention key/value LoRAs, which is the text context width of its base model.
    """
    sd = model.model
    family, context = model_family(sd.unet), sd.unet.config.context_dim
    hint = lora.family_hint
    if hint is not None and hint.split()[0] != family:
        raise LoraMismatchError(f"LoRA {lora_name!r} targets {hint}; the model {model.name} is {family}")
    for weights in lora.weights:
        down = weights.tensors.get("down")
        if weights.component != UNET or down is None or not re.search(r"attn2\.to_[kv]$", weights.module):
            continue
        width = int(down.shape[1])
        if width != context:
            base = _CONTEXT_FAMILIES.get(width, "another base model")
            raise LoraMismatchError(
                f"LoRA {lora_name!r} targets {base} (its cross-attention LoRAs take a {width}-wide text context, "
                f"e.g. {weights.source or weights.module}); the model {model.name} is {family} "
                f"(a {context}-wide text context)"
            )


@dataclass(frozen=True)
class LoraPatch:
    """One LoRA file's UNet part (applied while sampling) or text-encoder part (applied while encoding)."""

    file_name: str
    lora: LoraFile = field(repr=False)
    for_text: bool
    strength: float
    fuse: bool = True

    @property
    def label(self) -> str:
        part = "text encoders" if self.for_text else "UNet"
        return f"LoRA {self.file_name} ({part} x{self.strength:g}{', fused' if self.fuse else ''})"

    def part(self) -> LoraFile:
        weights = [w for w in self.lora.weights if (w.component != UNET) == self.for_text]
        return replace(self.lora, weights=weights, unmatched=[])

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if (run is None) != self.for_text or self.strength == 0.0:
            return _nothing
        part = self.part()
        if not part.weights:
            return _nothing
        manager = (
            SDLoraManager.for_models(model.unet, model.text_encoder, model.text_encoder_2)
            if self.for_text
            else SDLoraManager.for_models(model.unet)
        )
        manager.add_loras(
            self.file_name,
            part,
            unet_scale=self.strength,
            text_encoder_scale=self.strength,
            source=self.file_name,
        )
        if self.fuse:
            try:
                manager.fuse()
            except BaseException:
                manager.clear()
                raise
        return manager.clear


def _nothing() -> None:
    return None


class FluxionLoraLoader:
    """Add a LoRA to a model and its text encoders, each with its own strength."""

    DESCRIPTION = (
        "Wires a LoRA onto the model and its text encoders (kohya/A1111, diffusers/peft, LyCORIS LoHa/LoKr, "
        "DoRA). Stack as many as you like. Nothing is half-loaded: the node reports how many layers each LoRA "
        "reached and every key it left out, and refuses a LoRA made for another base model."
    )
    CATEGORY = "fluxion/loaders"
    FUNCTION = "load"
    RETURN_TYPES = (MODEL, CLIP, "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA added to its adapter stack.",
        "The text encoders with the LoRA added.",
        "What was applied and what was not.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        strength = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the LoRA to."}),
                "clip": (CLIP, {"tooltip": "The text encoders to add the LoRA to."}),
                "lora_name": (list_model_files("loras"), {"tooltip": "LoRA file in models/loras."}),
                "strength_model": ("FLOAT", dict(strength, tooltip="Strength on the UNet (0 turns it off).")),
                "strength_clip": (
                    "FLOAT",
                    dict(strength, tooltip="Strength on the text encoders (0 turns it off)."),
                ),
                "fuse": (
                    "BOOLEAN",
                    {
                        "default": True,
                        "tooltip": "Merge into the weights while sampling: no per-step cost; weights restored exactly after.",
                    },
                ),
            }
        }

    def load(
        self,
        model: ModelWire,
        clip: ClipWire,
        lora_name: str,
        strength_model: float,
        strength_clip: float,
        fuse: bool = True,
    ) -> tuple[ModelWire, ClipWire, str]:
        path = model_file_path("loras", lora_name)
        state_dict = read_state_dict(path, what="LoRA")
        kind = describe_model_kind(list(state_dict))
        if kind in NOT_LORAS:
            found = f"this is {kind}, not a LoRA ({describe_keys(list(state_dict))})"
            raise ModelFileError(path, "LoRA", found, LORA_EXPECTED)
        sd = model.model
        probe = SDLoraManager.for_models(sd.unet, sd.text_encoder, sd.text_encoder_2)
        lora = normalize_lora(state_dict, probe.namespace, read_metadata(path, what="LoRA"))
        check_lora_family(lora_name, lora, model)
        try:  # a dry run: raises (naming the file and the family it targets) when nothing fits
            report = probe.add_loras(lora_name, lora, source=lora_name)
        finally:
            probe.clear()
        text = str(report)
        print(f"[Fluxion] {text}")
        return (
            model.with_patch(LoraPatch(lora_name, lora, for_text=False, strength=strength_model, fuse=fuse)),
            clip.with_patch(LoraPatch(lora_name, lora, for_text=True, strength=strength_clip, fuse=False)),
            text,
        )


NODE_CLASS_MAPPINGS = {"FluxionLoraLoader": FluxionLoraLoader}
NODE_DISPLAY_NAME_MAPPINGS = {"FluxionLoraLoader": "Fluxion Load LoRA"}
