"""Wire a LoRA (kohya/A1111, diffusers/peft, LyCORIS LoHa/LoKr, DoRA) onto a model and its text encoders."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..fluxion.casting import cover_new_layers
from ..foundationals.formats.lora import LoraFile, normalize_lora
from ..foundationals.latent_diffusion.adapters.lora import (
    LORA_SCHEDULE_CONTEXT,
    LoraMismatchError,
    SDLoraManager,
    model_family,
    set_lora_progress,
)
from ..foundationals.latent_diffusion.adapters.regional import Region, latent_region_mask, new_region_name
from ..foundationals.latent_diffusion.model_patch import SamplingRun, Undo
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from ..foundationals.model_files import (
    ModelFileError,
    describe_keys,
    describe_model_kind,
    read_metadata,
    read_state_dict,
)
from .host import list_model_files, model_file_path, offload_device
from .latent_nodes import require_finite
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
    """One LoRA file's UNet part (applied while sampling) or text-encoder part (applied while encoding).

    The UNet part may be scheduled (acts on steps whose progress is in [start, end)) and/or regional
    (`mask`: acts only there, by blending predictions; see `regional`); either keeps it unfused.
    """

    file_name: str
    lora: LoraFile = field(repr=False)
    for_text: bool
    strength: float
    fuse: bool = True
    start: float = 0.0
    end: float = 1.0
    mask: torch.Tensor | None = field(default=None, repr=False, compare=False)
    keep_outside: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"LoRA start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}"
            )

    @property
    def scheduled(self) -> bool:
        return (self.start, self.end) != (0.0, 1.0)

    @property
    def label(self) -> str:
        part = "text encoders" if self.for_text else "UNet"
        options = [f"{part} x{self.strength:g}"]
        if not self.for_text and self.scheduled:
            options.append(f"steps {self.start:g}-{self.end:g}")
        if not self.for_text and self.mask is not None:
            options.append("masked, outside kept" if self.keep_outside else "masked")
        if self.fuse and not (self.scheduled or self.mask is not None):
            options.append("fused")
        return f"LoRA {self.file_name} ({', '.join(options)})"

    def part(self) -> LoraFile:
        weights = [w for w in self.lora.weights if (w.component != UNET) == self.for_text]
        return replace(self.lora, weights=weights, unmatched=[])

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if (run is None) != self.for_text or self.strength == 0.0:
            return _nothing
        part = self.part()
        if not part.weights:
            return _nothing
        if self.for_text:
            manager = SDLoraManager.for_models(model.unet, model.text_encoder, model.text_encoder_2)
        else:  # fused weights keep their originals where the host offloads the UNet (the CPU, usually)
            manager = SDLoraManager.for_models(model.unet, backup_device=offload_device(model.unet))
        manager.add_loras(
            self.file_name,
            part,
            unet_scale=self.strength,
            text_encoder_scale=self.strength,
            source=self.file_name,
        )
        if run is None:
            for encoder in (model.text_encoder, model.text_encoder_2):
                if encoder is not None:  # the LoRA layers compute as the encoder does (see fluxion.casting)
                    cover_new_layers(encoder)
            return manager.clear
        try:
            undo_timing = self._time(manager, model, run)
        except BaseException:
            manager.clear()
            raise

        def undo() -> None:
            try:
                undo_timing()
            finally:
                manager.clear()

        return undo

    def _time(self, manager: SDLoraManager, model: StableDiffusion, run: SamplingRun) -> Undo:
        """Make the UNet part regional, scheduled or fused as asked; return what undoes that."""
        unet = model.unet
        if self.mask is not None:
            region = Region(
                new_region_name(f"LoRA {self.file_name}"),
                latent_region_mask(self.mask, run.latent_height, run.latent_width),
                self.start,
                self.end,
                keep_outside=self.keep_outside,
            )
            manager.set_region(self.file_name, region.name)
            run.regions.append(region)
            return lambda: run.regions.remove(region)
        if self.scheduled:
            manager.set_schedule(self.file_name, self.start, self.end)

            def on_step(step: int) -> None:
                set_lora_progress(unet, run.progress(step))

            on_step(run.first_step)
            run.on_step(on_step)

            def unschedule() -> None:
                run.step_hooks.remove(on_step)
                unet.provider.contexts.pop(LORA_SCHEDULE_CONTEXT, None)

            return unschedule
        if self.fuse:
            manager.fuse()
        return _nothing


def _nothing() -> None:
    return None


def read_lora(model: ModelWire, lora_name: str) -> tuple[LoraFile, str]:
    """Read and check a LoRA file for `model`: its normalized weights and the load report.

    Refuses files that are not LoRAs, LoRAs of another base model and LoRAs of which nothing fits, naming
    the file; the report lists every key that was left out.
    """
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
    return lora, text


STRENGTH = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}


class ShowsReport:
    """A node whose last output is a text report, also shown on the node itself (the pack's web extension shows
    `ui.text`); `load` computes the outputs, the node's FUNCTION adds the text for the UI."""

    FUNCTION = "load_and_show"

    def load_and_show(self, **inputs: Any) -> dict[str, Any]:
        outputs = self.load(**inputs)  # type: ignore[attr-defined]
        return {"ui": {"text": [outputs[-1]]}, "result": tuple(outputs)}


FUSE_TOOLTIP = "Merge into the weights while sampling: no per-step cost; weights restored exactly after."
NO_LORA = "None"


class FluxionLoraLoader(ShowsReport):
    """Add a LoRA to a model and its text encoders, each with its own strength."""

    DESCRIPTION = (
        "Wires a LoRA onto the model and its text encoders (kohya/A1111, diffusers/peft, LyCORIS LoHa/LoKr, "
        "DoRA). Stack as many as you like. Nothing is half-loaded: the node reports how many layers each LoRA "
        "reached and every key it left out, and refuses a LoRA made for another base model."
    )
    CATEGORY = "fluxion/loaders"
    RETURN_TYPES = (MODEL, CLIP, "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRA added to its adapter stack.",
        "The text encoders with the LoRA added.",
        "What was applied and what was not (also shown on the node).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the LoRA to."}),
                "clip": (CLIP, {"tooltip": "The text encoders to add the LoRA to."}),
                "lora_name": (list_model_files("loras"), {"tooltip": "LoRA file in models/loras."}),
                "strength_model": ("FLOAT", dict(STRENGTH, tooltip="Strength on the UNet (0 turns it off).")),
                "strength_clip": (
                    "FLOAT",
                    dict(STRENGTH, tooltip="Strength on the text encoders (0 turns it off)."),
                ),
                "fuse": ("BOOLEAN", {"default": True, "tooltip": FUSE_TOOLTIP}),
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
        lora, report = read_lora(model, lora_name)
        return (
            model.with_patch(LoraPatch(lora_name, lora, for_text=False, strength=strength_model, fuse=fuse)),
            clip.with_patch(LoraPatch(lora_name, lora, for_text=True, strength=strength_clip, fuse=False)),
            report,
        )


STACK_SLOTS = 4
BLEND, KEEP = "blend", "keep"
OUTSIDE_MASK_MODES = (BLEND, KEEP)
OUTSIDE_MASK_TOOLTIP = (
    "blend: every step predicts as without the LoRA outside the mask, and the image stays coherent across "
    "its edge (the outside may shift a little). keep: the outside ends exactly as the image without the "
    "LoRA (the run samples once without it first: one more UNet pass per step)."
)


class FluxionLoraStack(ShowsReport):
    """Several LoRAs in one node, each with its own model and clip strengths."""

    DESCRIPTION = (
        f"Wires up to {STACK_SLOTS} LoRAs onto the model and its text encoders, in order, as that many "
        "Fluxion Load LoRA nodes would. Slots set to None are skipped. Fused LoRAs cost nothing per step."
    )
    CATEGORY = "fluxion/loaders"
    RETURN_TYPES = (MODEL, CLIP, "STRING")
    RETURN_NAMES = ("model", "clip", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the LoRAs added to its adapter stack.",
        "The text encoders with the LoRAs added.",
        "What each LoRA applied and what it did not (also shown on the node).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        required: dict[str, tuple] = {
            "model": (MODEL, {"tooltip": "The model to add the LoRAs to."}),
            "clip": (CLIP, {"tooltip": "The text encoders to add the LoRAs to."}),
        }
        files = [NO_LORA, *list_model_files("loras")]
        for slot in range(1, STACK_SLOTS + 1):
            required[f"lora_{slot}"] = (
                files,
                {"default": NO_LORA, "tooltip": f"LoRA {slot} in models/loras (None: empty slot)."},
            )
            required[f"strength_model_{slot}"] = (
                "FLOAT",
                dict(STRENGTH, tooltip=f"Strength of LoRA {slot} on the UNet."),
            )
            required[f"strength_clip_{slot}"] = (
                "FLOAT",
                dict(STRENGTH, tooltip=f"Strength of LoRA {slot} on the text encoders."),
            )
        required["fuse"] = ("BOOLEAN", {"default": True, "tooltip": FUSE_TOOLTIP})
        return {"required": required}

    def load(
        self, model: ModelWire, clip: ClipWire, fuse: bool = True, **slots: Any
    ) -> tuple[ModelWire, ClipWire, str]:
        names = [slots.get(f"lora_{slot}", NO_LORA) for slot in range(1, STACK_SLOTS + 1)]
        chosen = [name for name in names if name != NO_LORA]
        if len(set(chosen)) != len(chosen):
            raise ValueError(
                f"the same LoRA is in two slots ({chosen}): use one slot with the summed strength"
            )
        reports: list[str] = []
        for slot, name in enumerate(names, start=1):
            if name == NO_LORA:
                continue
            lora, report = read_lora(model, name)
            unet = float(slots.get(f"strength_model_{slot}", 1.0))
            text = float(slots.get(f"strength_clip_{slot}", 1.0))
            model = model.with_patch(LoraPatch(name, lora, for_text=False, strength=unet, fuse=fuse))
            clip = clip.with_patch(LoraPatch(name, lora, for_text=True, strength=text, fuse=False))
            reports.append(report)
        return model, clip, "\n".join(reports) or "no LoRA chosen"


class FluxionRegionalLora(ShowsReport):
    """A LoRA on the UNet restricted to a mask and/or to part of the sampling steps."""

    DESCRIPTION = (
        "Wires a LoRA onto the model's UNet for a region of the image (mask) and/or a window of the steps "
        "(start/end). Outside the mask each step predicts exactly as without the LoRA: each step runs one "
        "more UNet pass with the LoRA, masked at every resolution, and blends it in by the mask. With "
        "outside_mask 'keep' the outside also ends exactly as the image without the LoRA (one more pass per "
        "step). Outside the window the LoRA is off and costs nothing. It stays unfused. The text encoders are "
        "not changed: use Fluxion Load LoRA with strength_model 0 for a LoRA's clip part."
    )
    CATEGORY = "fluxion/loaders"
    RETURN_TYPES = (MODEL, "STRING")
    RETURN_NAMES = ("model", "report")
    OUTPUT_TOOLTIPS = (
        "The model with the regional/scheduled LoRA added.",
        "What was applied and what was not (also shown on the node).",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        fraction = {"min": 0.0, "max": 1.0, "step": 0.01}
        return {
            "required": {
                "model": (MODEL, {"tooltip": "The model to add the LoRA to."}),
                "lora_name": (list_model_files("loras"), {"tooltip": "LoRA file in models/loras."}),
                "strength_model": ("FLOAT", dict(STRENGTH, tooltip="Strength on the UNet (0 turns it off).")),
                "start": (
                    "FLOAT",
                    dict(
                        fraction,
                        default=0.0,
                        tooltip="Fraction of the steps done when the LoRA starts acting.",
                    ),
                ),
                "end": (
                    "FLOAT",
                    dict(
                        fraction,
                        default=1.0,
                        tooltip="Fraction of the steps done when the LoRA stops (1: to the end).",
                    ),
                ),
                "outside_mask": (
                    list(OUTSIDE_MASK_MODES),
                    {"default": BLEND, "tooltip": OUTSIDE_MASK_TOOLTIP},
                ),
            },
            "optional": {
                "mask": (
                    "MASK",
                    {
                        "tooltip": "Where the LoRA acts (1) and where the image stays as without it (0); any size, resized to the latents. None: everywhere."
                    },
                ),
            },
        }

    def load(
        self,
        model: ModelWire,
        lora_name: str,
        strength_model: float,
        start: float,
        end: float,
        outside_mask: str = BLEND,
        mask: torch.Tensor | None = None,
    ) -> tuple[ModelWire, str]:
        if outside_mask not in OUTSIDE_MASK_MODES:
            raise ValueError(
                f"outside_mask must be one of {', '.join(OUTSIDE_MASK_MODES)}, got {outside_mask!r}"
            )
        if start > end:
            raise ValueError(f"start ({start:g}) must not be after end ({end:g})")
        if mask is not None:
            require_finite(mask, "the LoRA mask")
            mask = mask.detach().clone().float()  # the input stays untouched; the wire keeps its own copy
        lora, report = read_lora(model, lora_name)
        patch = LoraPatch(
            lora_name,
            lora,
            for_text=False,
            strength=strength_model,
            fuse=False,
            start=start,
            end=end,
            mask=mask,
            keep_outside=outside_mask == KEEP,
        )
        return model.with_patch(patch), report


NODE_CLASS_MAPPINGS = {
    "FluxionLoraLoader": FluxionLoraLoader,
    "FluxionLoraStack": FluxionLoraStack,
    "FluxionRegionalLora": FluxionRegionalLora,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "FluxionLoraLoader": "Fluxion Load LoRA",
    "FluxionLoraStack": "Fluxion LoRA Stack",
    "FluxionRegionalLora": "Fluxion Regional / Scheduled LoRA",
}
