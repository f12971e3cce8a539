"""`python -m nodes demo`: run every example workflow headless on tiny weights made on the spot.

The demo writes tiny random models in the real file layouts (an original single-file SD1.5 checkpoint,
a kohya LoRA, ...) under the names the examples use, plus an input image, into a temporary models
folder, then runs each API-format workflow of `examples/workflows/` and prints where its images went.
Nothing is downloaded. The images are noise-like (random weights), but every node runs for real.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..fluxion import layers as fl
from ..fluxion.utils import save_to_safetensors
from ..foundationals.clip.config import image_preset, text_preset
from ..foundationals.clip.image_encoder import CLIPImageEncoder, load_clip_image_encoder
from ..foundationals.clip.text_encoder import CLIPTextEncoder, transformer_layer_names
from ..foundationals.formats.clip import IMAGE_LAYOUTS, export_clip_state_dict
from ..foundationals.formats.controlnet import lllyasviel_controlnet_key_map
from ..foundationals.latent_diffusion.adapters.controlnet import (
    ControlNet,
    ControlNetConfig,
    UnionControlNet,
    UnionControlNetConfig,
    union_controlnet_tensors,
)
from ..foundationals.latent_diffusion.adapters.ip_adapter import (
    ImageEmbeddings,
    ip_adapter_from_state_dict,
)
from ..foundationals.latent_diffusion.adapters.lora import text_encoder_lora_module_map, unet_lora_module_map
from ..foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from ..foundationals.latent_diffusion.checkpoint_export import save_single_file
from ..foundationals.latent_diffusion.model_config import TINY_8X_AUTOENCODER, TINY_SDXL_UNET, TINY_UNET
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from ..foundationals.latent_diffusion.unet import UNet, cross_attention_blocks
from . import host
from .cli import register_command
from .runner import NodeFailedError, Runner, all_node_classes
from .workflow import WorkflowError, load_workflow

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "workflows"
SD15_CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
DEMO_LORA = "fluxion_demo_lora.safetensors"
DEMO_LORA_2 = "fluxion_demo_lora_2.safetensors"
DEMO_LOCON = "fluxion_demo_locon.safetensors"
DEMO_CONTROLNET = "control_v11p_sd15_canny.safetensors"
DEMO_CONTROL_LORA = "control-lora-canny-rank128.safetensors"
DEMO_IP_ADAPTER = "ip-adapter_sd15.safetensors"
DEMO_UNION_CONTROLNET = "controlnet-union-sdxl-1.0/diffusion_pytorch_model_promax.safetensors"
"""The ProMax file where the public release (xinsir/controlnet-union-sdxl-1.0) has it, in a folder of its name."""
DEMO_CLIP_VISION = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
DEMO_IP_ADAPTER_PLUS = "ip-adapter-plus_sd15.safetensors"
DEMO_SDXL_IP_ADAPTER = "ip-adapter_sdxl.safetensors"
DEMO_CLIP_VISION_BIGG = "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"
TINY_BIGG_PROJECTION = 40  # the tiny "bigG" image embedding: unlike the tiny ViT-H's 24, so pairings are real
SECOND_IMAGE = "example_2.png"
MASK_IMAGE = "example_mask.png"
DEMO_EMBEDS = "example_ipadapter_embeds.safetensors"
DEMO_FACEID = "ip-adapter-faceid_sd15.bin"
DEMO_FACEID_LORA = "ip-adapter-faceid_sd15_lora.safetensors"
DEMO_FACEID_PLUSV2 = "ip-adapter-faceid-plusv2_sd15.bin"
DEMO_FACEID_PLUSV2_LORA = "ip-adapter-faceid-plusv2_sd15_lora.safetensors"
DEMO_SDXL_FACEID = "ip-adapter-faceid_sdxl.bin"
DEMO_FACE_EMBEDS = "example_face.npy"
FACE_EMBEDDING_DIM = 512  # insightface's identity embedding, as the real FaceID files read
INPUT_IMAGE = "example.png"
INPAINT_IMAGE = "example_inpaint.png"


def tiny_sd15(seed: int = 0) -> StableDiffusion:
    """A tiny SD1.5-shaped model with random weights (downscaling by 8 like the real one)."""
    torch.manual_seed(seed)
    model = StableDiffusion(
        UNet(TINY_UNET), LatentDiffusionAutoencoder(TINY_8X_AUTOENCODER), CLIPTextEncoder(text_preset("tiny"))
    )
    _redraw(model)
    return model


def _redraw(model: StableDiffusion) -> None:
    with torch.no_grad():  # default inits leave zero layers: make every weight matter
        for name, parameter in [*model.unet.named_parameters(), *model.autoencoder.named_parameters()]:
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.05)
            elif not name.endswith("weight"):
                parameter.normal_(0.0, 0.02)


def tiny_sdxl(seed: int = 5) -> StableDiffusion:
    """A tiny SDXL-shaped model with random weights (two text encoders, size conditioning)."""
    torch.manual_seed(seed)
    model = StableDiffusion(
        UNet(TINY_SDXL_UNET),
        LatentDiffusionAutoencoder(TINY_8X_AUTOENCODER.with_changes(scaling_factor=0.13025)),
        CLIPTextEncoder(text_preset("tiny")),
        CLIPTextEncoder(text_preset("tiny_bigg")),
    )
    _redraw(model)
    return model


def kohya_lora(model: StableDiffusion, rank: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on the attention projections of `model`'s UNet and text encoder."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    places: list[tuple[str, torch.nn.Module, str]] = [
        ("lora_unet_", model.unet, module) for module in unet_lora_module_map(model.unet) if ".attn" in module
    ]
    places += [
        ("lora_te_", model.text_encoder, m)
        for m in text_encoder_lora_module_map(model.text_encoder)
        if "self_attn" in m
    ]
    maps = {
        id(model.unet): unet_lora_module_map(model.unet),
        id(model.text_encoder): text_encoder_lora_module_map(model.text_encoder),
    }
    for prefix, root, module in places:
        layer = root.get_submodule(maps[id(root)][module])
        out_features, in_features = layer.weight.shape[:2]
        name = prefix + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def kohya_locon(model: StableDiffusion, rank: int = 4, seed: int = 22) -> dict[str, torch.Tensor]:
    """A kohya "LoCon" LoRA on the 3x3 convolutions of `model`'s UNet ResNet blocks."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    mapping = unet_lora_module_map(model.unet)
    for module, ours in mapping.items():
        if ".resnets." not in module or not module.endswith(("conv1", "conv2")):
            continue
        out_channels, in_channels = model.unet.get_submodule(ours).weight.shape[:2]
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_channels, 3, 3, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_channels, rank, 1, 1, generator=generator) * 0.1
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    return tensors


def lllyasviel_controlnet(seed: int = 2) -> dict[str, torch.Tensor]:
    """A tiny ControlNet for the tiny SD1.5 model, in the lllyasviel 1.1 single-file layout."""
    torch.manual_seed(seed)
    controlnet = ControlNet(ControlNetConfig(TINY_UNET))
    with torch.no_grad():  # zero convolutions start at zero: give them weights so the control shows
        for parameter in controlnet.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.05)
    state = controlnet.state_dict()
    return {
        "control_model." + theirs: state[ours]
        for theirs, ours in lllyasviel_controlnet_key_map(controlnet).items()
    }


def union_controlnet_file(seed: int = 4) -> dict[str, torch.Tensor]:
    """A tiny ControlNet Union ProMax (8 control types) for the tiny SDXL model, in the diffusers layout."""
    torch.manual_seed(seed)
    base = ControlNetConfig(TINY_SDXL_UNET, 3, (8, 16, 16, 32))  # 8x hints, as the tiny autoencoder
    config = UnionControlNetConfig(base, type_embedding_dim=TINY_SDXL_UNET.time_id_embedding_dim)
    controlnet = UnionControlNet(config)
    with torch.no_grad():  # zero convolutions and the projection start at zero: give them weights
        for parameter in controlnet.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, 0.05)
    return union_controlnet_tensors(controlnet)


def stability_control_lora(model: StableDiffusion, rank: int = 4, seed: int = 15) -> dict[str, torch.Tensor]:
    """A tiny Control-LoRA for `model` (the tiny SDXL one) in Stability's layout: the `lora_controlnet` marker,
    the ControlNet's own layers (hint encoder, zero convolutions) in full, and for the layers copied from the
    UNet new biases and norms in full and every other weight as a rank-`rank` pair `.up` / `.down`."""
    generator = torch.Generator().manual_seed(seed)
    unet = model.unet.state_dict()
    controlnet = ControlNet(ControlNetConfig(model.unet.config), device="meta")
    tensors: dict[str, torch.Tensor] = {"lora_controlnet": torch.tensor([])}
    for theirs, ours in lllyasviel_controlnet_key_map(controlnet).items():
        shape = controlnet.state_dict()[ours].shape
        if ours not in unet:  # the ControlNet's own layers
            tensors[theirs] = torch.randn(shape, generator=generator) * (0.05 if len(shape) > 1 else 0.02)
        elif len(shape) < 2:
            tensors[theirs] = unet[ours] + torch.randn(shape, generator=generator) * 0.02
        else:
            module, (out_channels, in_channels, *kernel) = theirs.rpartition(".")[0], shape
            tensors[f"{module}.up"] = (
                torch.randn(out_channels, rank, *[1] * len(kernel), generator=generator) * 0.1
            )
            tensors[f"{module}.down"] = torch.randn(rank, in_channels, *kernel, generator=generator) * 0.1
    return tensors


def tiny_image_encoder_file(seed: int = 3, projection_dim: int | None = None) -> dict[str, torch.Tensor]:
    """A tiny CLIP vision encoder with projection (24-d, or `projection_dim`), in the transformers layout."""
    torch.manual_seed(seed)
    config = image_preset("tiny")
    if projection_dim is not None:
        config = dataclasses.replace(config, projection_dim=projection_dim)
    encoder = CLIPImageEncoder(config)
    names = transformer_layer_names(encoder.config.num_layers)
    return export_clip_state_dict(encoder.state_dict(), IMAGE_LAYOUTS["transformers"], names)


def tencent_ip_adapter(
    model: StableDiffusion, tokens: int = 4, seed: int = 4, embedding_dim: int | None = None
) -> dict[str, torch.Tensor]:
    """A base IP-Adapter for `model` in the tencent-ailab layout (flat safetensors names), reading image
    embeddings of `embedding_dim` (default: the tiny encoder's 24)."""
    generator = torch.Generator().manual_seed(seed)
    context = model.unet.config.context_dim
    embedding = embedding_dim or image_preset("tiny").projection_dim
    assert embedding is not None
    tensors = {
        "image_proj.proj.weight": torch.randn(tokens * context, embedding, generator=generator) * 0.2,
        "image_proj.proj.bias": torch.zeros(tokens * context),
        "image_proj.norm.weight": torch.ones(context),
        "image_proj.norm.bias": torch.zeros(context),
    }
    for index, block in enumerate(cross_attention_blocks(model.unet)):
        width = block.ensure_find(fl.Attention).inner_dim
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * index + 1}.{name}.weight"] = (
                torch.randn(width, context, generator=generator) * 0.2
            )
    return tensors


def tencent_ip_adapter_plus(
    model: StableDiffusion, queries: int = 6, width: int = 64, seed: int = 12
) -> dict[str, torch.Tensor]:
    """A plus IP-Adapter for `model` in the tencent-ailab layout: a 4-layer perceiver resampler (`width`
    wide, one 64-wide head, `queries` tokens) on the tiny encoder's penultimate hidden states."""
    generator = torch.Generator().manual_seed(seed)
    context = model.unet.config.context_dim
    hidden = image_preset("tiny").embedding_dim

    def rand(*shape: int, scale: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=generator)

    tensors = {
        "image_proj.latents": rand(1, queries, width, scale=width**-0.5),
        "image_proj.proj_in.weight": rand(width, hidden),
        "image_proj.proj_in.bias": rand(width),
        "image_proj.proj_out.weight": rand(context, width),
        "image_proj.proj_out.bias": rand(context),
        "image_proj.norm_out.weight": rand(context, mean=1.0, scale=0.1),
        "image_proj.norm_out.bias": rand(context),
    }
    for layer in range(4):
        prefix = f"image_proj.layers.{layer}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            tensors[f"{prefix}{norm}.weight"] = rand(width, mean=1.0, scale=0.1)
            tensors[f"{prefix}{norm}.bias"] = rand(width)
        tensors[prefix + "0.to_q.weight"] = rand(64, width)
        tensors[prefix + "0.to_kv.weight"] = rand(128, width)
        tensors[prefix + "0.to_out.weight"] = rand(width, 64)
        tensors[prefix + "1.1.weight"] = rand(4 * width, width)
        tensors[prefix + "1.3.weight"] = rand(width, 4 * width)
    for index, block in enumerate(cross_attention_blocks(model.unet)):
        inner = block.ensure_find(fl.Attention).inner_dim
        for name in ("to_k_ip", "to_v_ip"):
            tensors[f"ip_adapter.{2 * index + 1}.{name}.weight"] = rand(inner, context)
    return tensors


def tencent_ip_adapter_faceid(
    model: StableDiffusion, plus: bool = False, tokens: int = 4, hidden: int = 64, seed: int = 30
) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter FaceID (or FaceID Plus) for `model` as tencent-ailab's `.bin` nests it: `image_proj` =
    MLPProjModel (`proj.0`, `proj.2`, `norm` on a 512-d face embedding; Plus: with a 4-layer
    `perceiver_resampler.*` on the tiny encoder's hidden states, one 64-wide head), `ip_adapter` = to_k_ip /
    to_v_ip of every cross-attention (the `.bin`'s own LoRA tensors are left out: the LoRA file carries them)."""
    generator = torch.Generator().manual_seed(seed)
    context = model.unet.config.context_dim

    def rand(*shape: int, scale: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=generator)

    image_proj = {
        "proj.0.weight": rand(hidden, FACE_EMBEDDING_DIM, scale=0.05),
        "proj.0.bias": rand(hidden),
        "proj.2.weight": rand(tokens * context, hidden),
        "proj.2.bias": rand(tokens * context),
        "norm.weight": rand(context, mean=1.0, scale=0.1),
        "norm.bias": rand(context),
    }
    if plus:
        prefix = "perceiver_resampler."
        image_proj |= {
            prefix + "proj_in.weight": rand(context, image_preset("tiny").embedding_dim),
            prefix + "proj_in.bias": rand(context),
            prefix + "proj_out.weight": rand(context, context),
            prefix + "proj_out.bias": rand(context),
            prefix + "norm_out.weight": rand(context, mean=1.0, scale=0.1),
            prefix + "norm_out.bias": rand(context),
        }
        for layer in range(4):
            key = f"{prefix}layers.{layer}."
            for norm in ("0.norm1", "0.norm2", "1.0"):
                image_proj[f"{key}{norm}.weight"] = rand(context, mean=1.0, scale=0.1)
                image_proj[f"{key}{norm}.bias"] = rand(context)
            image_proj[key + "0.to_q.weight"] = rand(64, context)
            image_proj[key + "0.to_kv.weight"] = rand(128, context)
            image_proj[key + "0.to_out.weight"] = rand(context, 64)
            image_proj[key + "1.1.weight"] = rand(4 * context, context)
            image_proj[key + "1.3.weight"] = rand(context, 4 * context)
    ip_adapter: dict[str, torch.Tensor] = {}
    for index, block in enumerate(cross_attention_blocks(model.unet)):
        inner = block.ensure_find(fl.Attention).inner_dim
        for name in ("to_k_ip", "to_v_ip"):
            ip_adapter[f"{2 * index + 1}.{name}.weight"] = rand(inner, context)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def faceid_lora(model: StableDiffusion, rank: int = 4, seed: int = 31) -> dict[str, torch.Tensor]:
    """The LoRA a FaceID release ships, as its `_lora.safetensors`: kohya names after diffusers' module names
    (`lora_unet_<module>_<to_q|to_k|to_v|to_out_0>`) on every self- and cross-attention, no alpha."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for module, ours in unet_lora_module_map(model.unet).items():
        if not (".attn1." in module or ".attn2." in module) or not module.endswith(
            ("to_q", "to_k", "to_v", "to_out.0")
        ):
            continue
        out_features, in_features = model.unet.get_submodule(ours).weight.shape[:2]
        name = "lora_unet_" + module.replace(".", "_")
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_features, generator=generator) * 0.1
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_features, rank, generator=generator) * 0.1
    return tensors


def demo_face_embedding(seed: int = 32) -> np.ndarray:
    """A unit-norm 512-d vector, as insightface's `normed_embedding` of one face."""
    vector = torch.randn(FACE_EMBEDDING_DIM, generator=torch.Generator().manual_seed(seed))
    return (vector / vector.norm()).numpy().astype(np.float32)


def demo_embeds(model: StableDiffusion, image: np.ndarray) -> ImageEmbeddings:
    """What Fluxion Encode IP-Adapter Embeds gives for `image` with the demo's SD1.5 base IP-Adapter."""
    adapter = ip_adapter_from_state_dict(tencent_ip_adapter(model), Path(DEMO_IP_ADAPTER).stem)
    encoder = load_clip_image_encoder(tiny_image_encoder_file())
    return adapter.encode_images(encoder, torch.from_numpy(image).float()[None] / 255)


def demo_picture(size: int = 64) -> np.ndarray:
    """The demo's input picture: a soft gradient under a square and a disc with hard edges (for Canny)."""
    y, x = np.mgrid[0:size, 0:size]
    scale = 256 // size
    picture = np.stack([x * scale, y * scale, (x + y) * scale // 2], axis=-1).clip(0, 255).astype(np.uint8)
    picture[size // 6 : size // 2, size // 8 : size // 2] = (250, 235, 190)
    picture[np.hypot(x - size * 0.68, y - size * 0.62) < size * 0.2] = (20, 30, 160)
    return picture


def write_demo_files(models_dir: Path, input_dir: Path) -> None:
    """Tiny models under the file names the examples use, and the input images (and saved embeds)."""
    for folder in ("checkpoints", "loras", "controlnet", "ipadapter", "clip_vision"):
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
    input_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_sd15()
    sdxl = tiny_sdxl()
    save_single_file(model, models_dir / "checkpoints" / SD15_CHECKPOINT)
    save_single_file(sdxl, models_dir / "checkpoints" / SDXL_CHECKPOINT)
    save_to_safetensors(models_dir / "loras" / DEMO_LORA, kohya_lora(model), metadata={"ss_network_dim": "4"})
    save_to_safetensors(models_dir / "loras" / DEMO_LORA_2, kohya_lora(model, seed=21))
    save_to_safetensors(models_dir / "loras" / DEMO_LOCON, kohya_locon(model))
    save_to_safetensors(models_dir / "controlnet" / DEMO_CONTROLNET, lllyasviel_controlnet())
    save_to_safetensors(models_dir / "controlnet" / DEMO_CONTROL_LORA, stability_control_lora(sdxl))
    save_to_safetensors(models_dir / "ipadapter" / DEMO_IP_ADAPTER, tencent_ip_adapter(model))
    (models_dir / "controlnet" / DEMO_UNION_CONTROLNET).parent.mkdir(parents=True, exist_ok=True)
    save_to_safetensors(models_dir / "controlnet" / DEMO_UNION_CONTROLNET, union_controlnet_file())
    save_to_safetensors(models_dir / "clip_vision" / DEMO_CLIP_VISION, tiny_image_encoder_file())
    save_to_safetensors(models_dir / "ipadapter" / DEMO_IP_ADAPTER_PLUS, tencent_ip_adapter_plus(model))
    save_to_safetensors(
        models_dir / "ipadapter" / DEMO_SDXL_IP_ADAPTER,
        tencent_ip_adapter(sdxl, seed=13, embedding_dim=TINY_BIGG_PROJECTION),
    )
    save_to_safetensors(
        models_dir / "clip_vision" / DEMO_CLIP_VISION_BIGG,
        tiny_image_encoder_file(seed=14, projection_dim=TINY_BIGG_PROJECTION),
    )
    torch.save(tencent_ip_adapter_faceid(model), models_dir / "ipadapter" / DEMO_FACEID)
    torch.save(
        tencent_ip_adapter_faceid(model, plus=True, seed=33), models_dir / "ipadapter" / DEMO_FACEID_PLUSV2
    )
    torch.save(tencent_ip_adapter_faceid(sdxl, seed=34), models_dir / "ipadapter" / DEMO_SDXL_FACEID)
    save_to_safetensors(models_dir / "loras" / DEMO_FACEID_LORA, faceid_lora(model))
    save_to_safetensors(models_dir / "loras" / DEMO_FACEID_PLUSV2_LORA, faceid_lora(model, seed=35))
    np.save(input_dir / DEMO_FACE_EMBEDS, demo_face_embedding())
    y, x = np.mgrid[0:64, 0:64]
    picture = demo_picture()
    Image.fromarray(picture, mode="RGB").save(input_dir / INPUT_IMAGE)
    alpha = np.full((64, 64), 255, dtype=np.uint8)
    alpha[16:48, 16:48] = 0  # LoadImage's mask is 1 - alpha: the transparent square is repainted
    Image.fromarray(np.dstack([picture, alpha]), mode="RGBA").save(input_dir / INPAINT_IMAGE)
    radius = np.hypot(x - 32, y - 32)
    rings = np.stack([(radius * 16) % 256, 255 - radius * 4, np.full_like(radius, 96)], axis=-1)
    Image.fromarray(rings.clip(0, 255).astype(np.uint8), mode="RGB").save(input_dir / SECOND_IMAGE)
    left = np.full((64, 64), 255, dtype=np.uint8)
    left[:, :32] = 0  # transparent left half: LoadImage's MASK is 1 there (where the IP-Adapter acts)
    Image.fromarray(np.dstack([picture, left]), mode="RGBA").save(input_dir / MASK_IMAGE)
    demo_embeds(model, picture).save(input_dir / DEMO_EMBEDS)


def example_workflows() -> list[Path]:
    """The API-format twins of the example workflows."""
    return sorted(EXAMPLES.glob("*.api.json"))


def run_examples(output: Path, report: Callable[[str], None] = print) -> list[Path]:
    """Write the demo files into a temporary folder, run every example, return the images written."""
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="fluxion-demo-") as temporary:
        models_dir, input_dir = Path(temporary) / "models", Path(temporary) / "input"
        write_demo_files(models_dir, input_dir)
        host.set_models_dir(models_dir)
        host.set_input_directory(input_dir)
        host.set_output_directory(output)
        host.set_temp_directory(output / "temp")
        runner = Runner()
        for path in example_workflows():
            result = runner.run_workflow(load_workflow(path, all_node_classes()))
            for ui in result.ui.values():
                for image in ui.get("images", []):
                    folder = (
                        host.output_directory() if image.get("type") == "output" else host.temp_directory()
                    )
                    location = folder / image.get("subfolder", "") / image["filename"]
                    written.append(location)
                    report(f"{path.name}: {location}")
    return written


NEXT_STEPS = """\
The weights were tiny and random, made on the spot: the images are noise by design. The demo shows that
every node of every example runs, not what the models draw.
Next, the same workflows on real checkpoints (file names as in each workflow; checkpoints/, loras/,
controlnet/, ipadapter/, clip_vision/ as in ComfyUI's models/ folder):
  headless:   python -m nodes run examples/workflows/sd15_txt2img.json --models-dir /path/to/ComfyUI/models
  in ComfyUI: put this pack in ComfyUI/custom_nodes/, start ComfyUI and drag examples/workflows/sd15_txt2img.json
              (or any PNG written here) onto the canvas."""


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", type=Path, default=Path("output"), help="where images are saved (default: ./output)"
    )


def demo_command(args: argparse.Namespace) -> int:
    """Run the examples on tiny generated weights."""
    try:
        images = run_examples(args.output)
    except (WorkflowError, NodeFailedError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(
        f"{len(images)} images written to {args.output}, each with its workflow embedded (`prompt`, `workflow`)."
    )
    print(NEXT_STEPS)
    return 0


register_command("demo", "run every example workflow on tiny generated weights", _configure, demo_command)
