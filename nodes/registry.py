"""The pack's node registry: what ComfyUI loads (through the root `__init__.py`).

Each feature module declares its own `NODE_CLASS_MAPPINGS` / `NODE_DISPLAY_NAME_MAPPINGS`; they are
merged here. Every node id carries the "Fluxion" prefix so it cannot collide with ComfyUI's own nodes
or another pack's (see `contract.check_node_contract`). Node ids and the order of their inputs never
change once released: saved workflows store widget values by position.
"""

from __future__ import annotations

from types import ModuleType

from . import (
    acceleration_nodes,
    checkpoint_nodes,
    control_nodes,
    controlnet_union_nodes,
    core_model_nodes,
    faceid_nodes,
    guidance_nodes,
    image_prompt_nodes,
    ip_adapter_embeds_nodes,
    latent_nodes,
    lora_nodes,
    model_nodes,
    model_sampling_nodes,
    reference_only_nodes,
    sampler_nodes,
    style_aligned_nodes,
    text_nodes,
    training_nodes,
    upscale_nodes,
    vae_nodes,
)

FEATURE_MODULES: tuple[ModuleType, ...] = (
    checkpoint_nodes,
    text_nodes,
    latent_nodes,
    sampler_nodes,
    lora_nodes,
    control_nodes,
    controlnet_union_nodes,
    image_prompt_nodes,
    ip_adapter_embeds_nodes,
    faceid_nodes,
    reference_only_nodes,
    guidance_nodes,
    model_nodes,
    model_sampling_nodes,
    core_model_nodes,
    vae_nodes,
    upscale_nodes,
    training_nodes,
    style_aligned_nodes,
    acceleration_nodes,
)

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
for _module in FEATURE_MODULES:
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)
