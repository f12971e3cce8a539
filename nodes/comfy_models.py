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
