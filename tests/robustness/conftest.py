"""Shared fixtures of the robustness suite: the demo models folder (written once) plus the other family's files.

The demo writes the SD1.5 side (checkpoint, kohya LoRA, lllyasviel ControlNet, tencent IP-Adapter, CLIP
vision) and a tiny SDXL checkpoint; here the SDXL-side adapters are made from `tiny_sdxl()` the same way,
with a T2I-Adapter of each family, a CLIP vision encoder of the wrong width, a 9-channel inpainting
checkpoint, and files dropped into the wrong folders (a LoRA among ControlNets and the reverse).
"""

import dataclasses
import shutil

import pytest
import torch

from fluxion.utils import save_to_safetensors
from foundationals.clip.config import image_preset, text_preset
from foundationals.clip.image_encoder import CLIPImageEncoder
from foundationals.clip.text_encoder import CLIPTextEncoder, transformer_layer_names
from foundationals.formats.clip import IMAGE_LAYOUTS, export_clip_state_dict
from foundationals.formats.controlnet import lllyasviel_controlnet_key_map
from foundationals.formats.t2i_adapter import t2i_adapter_key_map
from foundationals.latent_diffusion.adapters.controlnet import ControlNet, ControlNetConfig
from foundationals.latent_diffusion.adapters.lora import text_encoder_lora_module_map, unet_lora_module_map
from foundationals.latent_diffusion.adapters.t2i_adapter import T2IAdapter, T2IAdapterConfig
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.checkpoint_export import save_single_file
from foundationals.latent_diffusion.model_config import TINY_8X_AUTOENCODER, TINY_SDXL_UNET, TINY_UNET
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet
from nodes import host
from nodes.demo import (
    DEMO_CONTROLNET,
    DEMO_LORA,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
    tencent_ip_adapter,
    tiny_sdxl,
    write_demo_files,
)
from nodes.wires import ClipWire, ModelWire, VaeWire

SDXL_LORA = "sdxl_kohya_lora.safetensors"
SDXL_CONTROLNET = "controlnet_sdxl_tiny.safetensors"
SD15_T2I = "t2iadapter_sd15_tiny.safetensors"
SDXL_T2I = "t2iadapter_sdxl_tiny.safetensors"
SDXL_IP_ADAPTER = "ip-adapter_sdxl.safetensors"
WRONG_CLIP_VISION = "clip_vision_16d.safetensors"
INPAINT_CHECKPOINT = "sd15_inpainting_tiny.safetensors"
LORA_IN_CONTROLNET = "actually_a_lora.safetensors"
CONTROLNET_IN_LORAS = "actually_a_controlnet.safetensors"


def kohya_sdxl_lora(model: StableDiffusion, rank: int = 4, seed: int = 6) -> dict[str, torch.Tensor]:
    """A kohya LoRA for an SDXL model: like demo.kohya_lora, with lora_te1_/lora_te2_ for its two encoders."""
    generator = torch.Generator().manual_seed(seed)
    assert model.text_encoder_2 is not None
    roots = [("lora_unet_", model.unet, unet_lora_module_map(model.unet), ".attn")]
    roots += [
        (prefix, encoder, text_encoder_lora_module_map(encoder), "self_attn")
        for prefix, encoder in (("lora_te1_", model.text_encoder), ("lora_te2_", model.text_encoder_2))
    ]
    tensors: dict[str, torch.Tensor] = {}
    for prefix, root, module_map, wanted in roots:
        for module, ours in module_map.items():
            if wanted not in module:
                continue
            out_features, in_features = root.get_submodule(ours).weight.shape[:2]
            name = prefix + module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
            tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
            tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def lllyasviel_controlnet_for(unet_config, seed: int = 7) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """demo.lllyasviel_controlnet for any UNet config (here: the tiny SDXL one)."""
    torch.manual_seed(seed)
    controlnet = ControlNet(ControlNetConfig(unet_config))
    with torch.no_grad():
        for parameter in controlnet.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.05)
    state = controlnet.state_dict()
    return {
        "control_model." + theirs: state[ours]
        for theirs, ours in lllyasviel_controlnet_key_map(controlnet).items()
    }


def tencentarc_t2i(config: T2IAdapterConfig, seed: int = 8) -> dict[str, torch.Tensor]:
    """A T2I-Adapter in the TencentARC layout."""
    torch.manual_seed(seed)
    adapter = T2IAdapter(config)
    state = adapter.state_dict()
    return {theirs: state[ours] for theirs, ours in t2i_adapter_key_map(adapter, "tencentarc").items()}


def image_encoder_file(projection_dim: int, seed: int = 9) -> dict[str, torch.Tensor]:
    """A tiny CLIP vision encoder whose image embedding has `projection_dim` (the demo's has 24)."""
    torch.manual_seed(seed)
    encoder = CLIPImageEncoder(dataclasses.replace(image_preset("tiny"), projection_dim=projection_dim))
    names = transformer_layer_names(encoder.config.num_layers)
    return export_clip_state_dict(encoder.state_dict(), IMAGE_LAYOUTS["transformers"], names)


def tiny_sd15_inpainting(seed: int = 10) -> StableDiffusion:
    """The tiny SD1.5 model with a 9-channel UNet (latents, mask, masked-image latents)."""
    torch.manual_seed(seed)
    model = StableDiffusion(
        UNet(TINY_UNET.with_changes(in_channels=9)),
        LatentDiffusionAutoencoder(TINY_8X_AUTOENCODER),
        CLIPTextEncoder(text_preset("tiny")),
    )
    with torch.no_grad():
        for name, parameter in [*model.unet.named_parameters(), *model.autoencoder.named_parameters()]:
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.05)
            elif not name.endswith("weight"):
                parameter.normal_(0.0, 0.02)
    return model


@pytest.fixture(scope="session")
def robustness_folders(tmp_path_factory):
    """models/ and input/ with the demo files and every wrong-pairing file, written once per session."""
    root = tmp_path_factory.mktemp("robustness")
    models = root / "models"
    write_demo_files(models, root / "input")
    sdxl = tiny_sdxl()
    save_to_safetensors(models / "loras" / SDXL_LORA, kohya_sdxl_lora(sdxl))
    save_to_safetensors(models / "controlnet" / SDXL_CONTROLNET, lllyasviel_controlnet_for(TINY_SDXL_UNET))
    channels = TINY_UNET.block_channels
    save_to_safetensors(
        models / "controlnet" / SD15_T2I, tencentarc_t2i(T2IAdapterConfig("full", channels, 1, 3, 8))
    )
    save_to_safetensors(
        models / "controlnet" / SDXL_T2I, tencentarc_t2i(T2IAdapterConfig("full_xl", channels, 1, 3, 16))
    )
    save_to_safetensors(models / "ipadapter" / SDXL_IP_ADAPTER, tencent_ip_adapter(sdxl))
    save_to_safetensors(models / "clip_vision" / WRONG_CLIP_VISION, image_encoder_file(16))
    save_single_file(tiny_sd15_inpainting(), models / "checkpoints" / INPAINT_CHECKPOINT)
    shutil.copy(models / "loras" / DEMO_LORA, models / "controlnet" / LORA_IN_CONTROLNET)
    shutil.copy(models / "controlnet" / DEMO_CONTROLNET, models / "loras" / CONTROLNET_IN_LORAS)
    return root


@pytest.fixture(autouse=True)
def robustness_host(request, tmp_path, monkeypatch):
    """Tests using the models get the shared folders; every test its own output/temp and no pending cancel."""
    if "robustness_folders" in request.fixturenames:
        root = request.getfixturevalue("robustness_folders")
        monkeypatch.setattr(host, "_models_dir", root / "models")
        monkeypatch.setattr(host, "_input_dir", root / "input")
    for name in ("output", "temp"):
        (tmp_path / name).mkdir()
    monkeypatch.setattr(host, "_output_dir", tmp_path / "output")
    monkeypatch.setattr(host, "_temp_dir", tmp_path / "temp")
    host.clear_cancel()
    yield
    host.clear_cancel()


def _wires(path, name: str) -> tuple[ModelWire, ClipWire, VaeWire]:  # noqa: ANN001
    model = StableDiffusion.from_checkpoint(path)
    return ModelWire(model, name), ClipWire(model, name), VaeWire(model, name)


@pytest.fixture(scope="session")
def sd15(robustness_folders):
    """The demo SD1.5 checkpoint's (model, clip, vae) wires, loaded once (tests must leave it unchanged)."""
    return _wires(robustness_folders / "models" / "checkpoints" / SD15_CHECKPOINT, SD15_CHECKPOINT)


@pytest.fixture(scope="session")
def sdxl(robustness_folders):
    """The demo SDXL checkpoint's wires, loaded once."""
    return _wires(robustness_folders / "models" / "checkpoints" / SDXL_CHECKPOINT, SDXL_CHECKPOINT)


@pytest.fixture(scope="session")
def sd15_inpainting(robustness_folders):
    """The 9-channel inpainting checkpoint's wires, loaded once."""
    return _wires(robustness_folders / "models" / "checkpoints" / INPAINT_CHECKPOINT, INPAINT_CHECKPOINT)
