"""ComfyUI glue for core models (host-side only): imported lazily, only when running inside ComfyUI.

This module imports `comfy` at import time, so nothing imports it at module level: the nodes that need it
(`core_model_nodes`) import it inside their function, after `host.is_hosted()` said ComfyUI is there. Like
`host.py` it is a host-side module; every other module of the pack stays importable without ComfyUI.

`core_model(wire)` gives a core `MODEL`: a `comfy.model_patcher.ModelPatcher` over a
`comfy.model_base.BaseModel` (SD1.5) / `SDXL` built with `disable_unet_model_creation` (no core UNet is
made), whose `diffusion_model` is a `FluxionDiffusionModel` over the wire's UNet. An OUTER_SAMPLE wrapper
applies the wire's adapter stack for each sampling run and undoes it after (see `core_models`).
"""

from __future__ import annotations

import math
from typing import Any

import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.supported_models

from ..foundationals.latent_diffusion.solvers import PredictionType
from .core_models import FluxionDiffusionModel, sampling_run
from .wires import ModelWire

WRAPPER_KEY = "fluxion_adapter_stack"


def _model_type(wire: ModelWire) -> Any:
    prediction = getattr(wire.model, "prediction_type", PredictionType.EPSILON)
    if prediction == PredictionType.EPSILON:
        return comfy.model_base.ModelType.EPS
    if prediction == PredictionType.V_PREDICTION:
        return comfy.model_base.ModelType.V_PREDICTION
    raise ValueError(f"{wire.name}: prediction type {prediction!r} has no core ModelType here")


def _uses_guidance(guider: Any) -> bool:
    """Whether core's sampling evaluates the negative: a negative cond and cfg != 1 (core's cfg1 shortcut)."""
    conds = getattr(guider, "original_conds", None) or getattr(guider, "conds", None) or {}
    if "negative" not in conds or not conds["negative"]:
        return False
    cfg = getattr(guider, "cfg", 1.0)
    options = getattr(guider, "model_options", {}) or {}
    return not math.isclose(float(cfg), 1.0) or bool(options.get("disable_cfg1_optimization", False))


def _outer_sample_wrapper(diffusion: FluxionDiffusionModel) -> Any:
    def outer_sample(
        executor: Any, noise: Any, latent_image: Any, sampler: Any, sigmas: Any, *args: Any, **kwargs: Any
    ) -> Any:
        run = sampling_run(tuple(noise.shape), int(sigmas.shape[-1]) - 1, _uses_guidance(executor.class_obj))
        with diffusion.sampling(run, sigmas):
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)

    return outer_sample


def core_model(wire: ModelWire) -> Any:
    """The wire as a core MODEL (ModelPatcher); the wire's UNet weights are shared, not copied."""
    unet = wire.model.unet
    config = unet.config
    sdxl = config.addition_embedding == "text_time"
    family = comfy.supported_models.SDXL if sdxl else comfy.supported_models.SD15
    unet_config = dict(family.unet_config)
    unet_config.update(
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        context_dim=config.context_dim,
        disable_unet_model_creation=True,
    )
    model_config = family(unet_config)
    diffusion = FluxionDiffusionModel(wire.model, wire.patches, wire.name)
    model_config.set_inference_dtype(diffusion.dtype, None)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    base_class = comfy.model_base.SDXL if sdxl else comfy.model_base.BaseModel
    base = base_class(model_config, model_type=_model_type(wire), device=next(unet.parameters()).device)
    if config.in_channels == 9:
        base.set_inpaint()
    base.diffusion_model = diffusion
    patcher = comfy.model_patcher.ModelPatcher(base, load_device=load_device, offload_device=offload_device)
    patcher.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, _outer_sample_wrapper(diffusion)
    )
    return patcher


# -- adopting core models ---------------------------------------------------------------------------------------


class CoreWeightsLoaded:
    """Patch: before each run (sampling, text encoding), ComfyUI loads the core model fully on its device.

    Our adopted modules hold the core modules' Parameter objects, so they follow every move ComfyUI makes;
    a partial (low-VRAM) load would leave some of them elsewhere, hence `force_full_load`.
    """

    def __init__(self, patcher: Any, what: str) -> None:
        self.patcher = patcher
        self.label = f"core {what} weights (loaded by ComfyUI)"

    def apply(self, model: Any, run: Any) -> Any:
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        return lambda: None


def _parameters(module: Any) -> dict[str, Any]:
    """A module's Parameter objects (and buffers) by name: what our modules are given, not copies."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _assign(target: Any, theirs: dict[str, Any], key_map: dict[str, str], what: str) -> None:
    """`target[ours] = theirs[their key]`, sharing the Parameter objects (reshaped views where LDM stores
    1x1 convolutions for our Linear layers); every key accounted for."""
    import torch

    missing = sorted(set(key_map) - set(theirs))
    unexpected = sorted(set(theirs) - set(key_map))
    if missing or unexpected:
        raise ValueError(
            f"Fluxion Adopt Core Model: the core {what} does not have the layout of its inferred architecture "
            f"({len(missing)} missing keys, e.g. {missing[:3]}; {len(unexpected)} unmapped keys, e.g. {unexpected[:3]})"
        )
    expected = {key: value.shape for key, value in target.state_dict().items()}
    tensors = {}
    for their_key, ours in key_map.items():
        tensor = theirs[their_key]
        if tensor.shape != expected[ours]:
            if tensor.numel() != expected[ours].numel():
                raise ValueError(
                    f"Fluxion Adopt Core Model: core {what} {their_key} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(expected[ours])}"
                )
            tensor = torch.nn.Parameter(tensor.detach().view(expected[ours]), requires_grad=False)
        tensors[ours] = tensor
    target.load_state_dict(tensors, strict=True, assign=True)


def _text_encoder(transformer: Any, with_projection: bool, what: str) -> Any:
    from ..foundationals.clip.text_encoder import load_clip_text_encoder

    state = _parameters(transformer)
    if not with_projection:
        state.pop("text_projection.weight", None)
    state = {
        key: value
        for key, value in state.items()
        if key.startswith("text_model.") or key == "text_projection.weight"
    }
    try:
        return load_clip_text_encoder(state, "transformers")
    except Exception as error:
        raise ValueError(
            f"Fluxion Adopt Core Model: the core {what} is not a CLIP text encoder we know: {error}"
        ) from error


def adopt_core_models(model: Any, clip: Any, vae: Any) -> tuple[Any, str]:
    """A `StableDiffusion` whose modules hold the Parameter objects of core's MODEL, CLIP and VAE."""
    from ..foundationals.clip.textual_inversion import EmbeddingLibrary
    from ..foundationals.formats.ldm import (
        infer_autoencoder_config,
        infer_unet_config,
        ldm_autoencoder_key_map,
        ldm_unet_key_map,
    )
    from ..foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
    from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
    from ..foundationals.latent_diffusion.unet import UNet
    from .host import model_search_paths

    for value, kind, name in (
        (model, comfy.model_patcher.ModelPatcher, "model"),
        (clip, object, "clip"),
        (vae, object, "vae"),
    ):
        if value is None or not isinstance(value, kind):
            raise ValueError(f"Fluxion Adopt Core Model: input {name!r} is not a core {name.upper()}")
    base = model.model
    if isinstance(getattr(base, "diffusion_model", None), FluxionDiffusionModel):
        raise ValueError(
            "Fluxion Adopt Core Model: this MODEL is already a Fluxion model (Fluxion To Core Model)"
        )
    if model.patches:
        raise ValueError(
            "Fluxion Adopt Core Model: the core MODEL carries core patches (e.g. core LoRA nodes): adopt the "
            "model straight from its loader and wire Fluxion LoRAs after this node"
        )
    sdxl = isinstance(base, comfy.model_base.SDXL)
    if not sdxl and type(base) is not comfy.model_base.BaseModel:
        raise ValueError(
            f"Fluxion Adopt Core Model: the core MODEL is {type(base).__name__}; only SD1.5 and SDXL models can be adopted"
        )
    if base.model_type != comfy.model_base.ModelType.EPS:
        raise ValueError(
            f"Fluxion Adopt Core Model: the core MODEL predicts {base.model_type.name}; only eps models can be adopted"
        )
    comfy.model_management.load_models_gpu([model, clip.patcher, vae.patcher], force_full_load=True)

    core_unet = _parameters(base.diffusion_model)
    shapes = {key: tuple(value.shape) for key, value in core_unet.items()}
    unet = UNet(infer_unet_config(shapes, "core MODEL"), device="meta")
    _assign(unet, core_unet, ldm_unet_key_map(unet), "UNet")

    core_vae = _parameters(vae.first_stage_model)
    vae_shapes = {key: tuple(value.shape) for key, value in core_vae.items()}
    scaling = float(base.latent_format.scale_factor)
    autoencoder = LatentDiffusionAutoencoder(
        infer_autoencoder_config(vae_shapes, scaling, "core VAE"), device="meta"
    )
    _assign(autoencoder, core_vae, ldm_autoencoder_key_map(autoencoder), "VAE")

    encoders = clip.cond_stage_model
    if not hasattr(encoders, "clip_l"):
        raise ValueError(
            "Fluxion Adopt Core Model: the core CLIP has no CLIP-L text encoder (not SD1.5 / SDXL)"
        )
    text_encoder = _text_encoder(encoders.clip_l.transformer, False, "CLIP-L")
    text_encoder_2 = None
    if sdxl:
        if not hasattr(encoders, "clip_g"):
            raise ValueError(
                "Fluxion Adopt Core Model: an SDXL MODEL needs an SDXL CLIP (CLIP-L and OpenCLIP bigG)"
            )
        text_encoder_2 = _text_encoder(encoders.clip_g.transformer, True, "OpenCLIP bigG")
    sd = StableDiffusion(
        unet=unet, autoencoder=autoencoder, text_encoder=text_encoder, text_encoder_2=text_encoder_2
    )
    folders = model_search_paths("embeddings")
    sd.embeddings = EmbeddingLibrary(folders, text_encoder.config.embedding_dim)
    if text_encoder_2 is not None:
        sd.embeddings_2 = EmbeddingLibrary(folders, text_encoder_2.config.embedding_dim)
    return sd, f"core {'SDXL' if sdxl else 'SD1.5'} model"


def adopted_patches(model: Any, clip: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The first patches of an adopted model's wires: core loads its weights fully before each run."""
    return (CoreWeightsLoaded(model, "UNet"),), (CoreWeightsLoaded(clip.patcher, "CLIP"),)
