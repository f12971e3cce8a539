"""Load Stable Diffusion checkpoints as users have them: original single files and diffusers folders.

- Single files (`.safetensors`, or `.ckpt/.pt/.pth/.bin` read with `torch.load(weights_only=True)`, a
  nested `state_dict` unwrapped) in the original LDM/SGM layout: `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (autoencoder), `cond_stage_model.*` / `conditioner.embedders.*` (text encoders,
  handed to `foundationals.clip`).
- EMA: like ComfyUI (and diffusers' default), the UNet comes from `model.diffusion_model.*`; `model_ema.*`
  copies in full training checkpoints are skipped. "emaonly" files already hold the EMA weights there.
- Diffusers folders: `unet/`, `vae/` (`config.json` + `diffusion_pytorch_model[.fp16].safetensors|.bin`),
  `text_encoder/`, `text_encoder_2/`.

Architectures are inferred from key names and tensor shapes (tiny test checkpoints load too); the family
(SD1.5, SD1.5 inpainting, SDXL) is detected, and SD2.x, SDXL refiner, SD3, Flux and unknown files are
refused with an error naming the file. Models are built on the meta device and loaded with
`load_state_dict(assign=True)`, tensors converted to the requested dtype (default float32) as they are
read: no random init and no second copy of fp32 weights. Every unmapped or missing key is an error.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ...fluxion import layers as fl
from ..clip.config import CLIPTextConfig
from ..formats.diffusers import diffusers_autoencoder_key_map, diffusers_unet_key_map
from ..formats.ldm import (
    LDM_AUTOENCODER_PREFIX,
    LDM_UNET_PREFIX,
    ldm_autoencoder_key_map,
    ldm_unet_key_map,
)
from .auto_encoder import LatentDiffusionAutoencoder
from .model_config import (
    SD15_AUTOENCODER,
    SDXL_AUTOENCODER,
    UNET_PRESETS,
    AutoencoderConfig,
    UNetConfig,
)
from .unet import UNet

TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.")
# Keys of full LDM training checkpoints that hold no inference weights (noise schedule buffers, EMA copies).
IGNORED_PREFIXES = ("model_ema.",)
IGNORED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "lvlb_weights",
    }
)
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A file that is not a loadable SD checkpoint; the message names the file and says what it looks like."""


class TensorFile:
    """The tensors of one file, read lazily: shapes without reading data, each tensor once when asked for."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._torch: dict[str, Tensor] | None = None
        if self.path.suffix == ".safetensors":
            try:
                self._safetensors = safe_open(str(self.path), framework="pt", device="cpu")  # type: ignore[no-untyped-call]
            except Exception as error:  # safetensors raises its own types for corrupt headers
                raise CheckpointError(f"{self.path}: not a readable safetensors file ({error})") from error
            self._keys = list(self._safetensors.keys())
        elif self.path.suffix in TORCH_SUFFIXES:
            self._torch = _torch_state_dict(self.path)
            self._keys = list(self._torch)
        else:
            raise CheckpointError(
                f"{self.path}: unknown weight file type (expected .safetensors or {TORCH_SUFFIXES})"
            )

    def keys(self) -> list[str]:
        """Every tensor name in the file."""
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape, without reading its data."""
        if self._torch is not None:
            return tuple(self._torch[key].shape)
        return tuple(self._safetensors.get_slice(key).get_shape())

    def tensor(self, key: str) -> Tensor:
        """A tensor as stored."""
        if self._torch is not None:
            return self._torch[key]
        return self._safetensors.get_tensor(key)


def _torch_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        try:
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (pre-zip) pickles cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(
            f"{path}: not a torch checkpoint loadable with weights_only=True ({error})"
        ) from error
    while isinstance(content, dict) and isinstance(content.get("state_dict"), dict):
        content = content["state_dict"]
    if not isinstance(content, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(content).__name__}")
    return {key: value for key, value in content.items() if isinstance(value, Tensor)}


@dataclass
class StableDiffusionCheckpoint:
    """What a checkpoint holds, ready to run: the UNet, the autoencoder and the text encoders it has."""

    source: Path
    family: str  # "sd15", "sd15_inpainting", "sdxl_base" or "sdxl_inpainting"
    unet: UNet
    autoencoder: LatentDiffusionAutoencoder | None = None
    text_encoders: dict[str, fl.Chain] = field(default_factory=dict)  # "clip_l", "clip_g"


# -- Architecture and family from keys and shapes ------------------------------------------------------------


def _count(keys: Iterable[str], pattern: str) -> int:
    """How many distinct values the `(\\d+)` group of `pattern` takes among `keys`."""
    regex = re.compile(pattern)
    return len({match.group(1) for key in keys if (match := regex.match(key))})


def infer_unet_config(shapes: Mapping[str, tuple[int, ...]], source: str = "checkpoint") -> UNetConfig:
    """A UNet config from LDM UNet key shapes (no prefix); heads from the matching preset, else SD's defaults.

    Shapes that form no Stable Diffusion UNet (a tensor of the wrong rank, a zero width, levels that do not
    line up) raise `CheckpointError` naming `source`.
    """
    try:
        config = _infer_unet_config(shapes, source)
    except (IndexError, TypeError, ValueError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(
            f"{source}: the UNet key shapes form no Stable Diffusion UNet ({type(error).__name__}: {error})"
        ) from error
    sizes = (config.in_channels, config.out_channels, config.context_dim, *config.block_channels)
    if min(sizes) <= 0:
        raise CheckpointError(f"{source}: the UNet key shapes give a zero width ({config})")
    return config


def _infer_unet_config(shapes: Mapping[str, tuple[int, ...]], source: str) -> UNetConfig:
    try:
        conv_in = shapes["input_blocks.0.0.weight"]
        out_channels = shapes["out.2.weight"][0]
    except KeyError as error:
        raise CheckpointError(f"{source}: no LDM UNet input/output convolution ({error.args[0]})") from error
    keys = list(shapes)
    levels: list[list[tuple[int, int]]] = [[]]
    for index in range(1, _count(keys, r"input_blocks\.(\d+)\.") + 1):
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{index}.0.out_layers.3.weight" in shapes:
            width = shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0]
            depth = _count(keys, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\.")
            levels[-1].append((width, depth))
    layers_per_block = len(levels[0])
    if layers_per_block == 0 or any(len(level) != layers_per_block for level in levels):
        raise CheckpointError(f"{source}: irregular UNet levels {levels} (not a Stable Diffusion UNet)")
    context = [shape[1] for key, shape in shapes.items() if key.endswith("attn2.to_k.weight")]
    projection = [shape for key, shape in shapes.items() if key.endswith("proj_in.weight")]
    config = UNetConfig(
        in_channels=conv_in[1],
        out_channels=out_channels,
        block_channels=tuple(level[0][0] for level in levels),
        layers_per_block=layers_per_block,
        transformer_depth=tuple(level[0][1] for level in levels),
        middle_transformer_depth=_count(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
        context_dim=context[0] if context else 768,
        use_linear_projection=bool(projection) and len(projection[0]) == 2,
    )
    if "label_emb.0.0.weight" in shapes:
        config = config.with_changes(addition_embedding="text_time")
        addition_dim = shapes["label_emb.0.0.weight"][1]
    else:
        addition_dim = None
    return _with_heads(config, addition_dim)


def _with_heads(config: UNetConfig, addition_dim: int | None) -> UNetConfig:
    """Fill in what shapes cannot tell (heads, time-id width) from a preset of the same shape, else SD's."""
    unseen = (
        "in_channels",
        "num_attention_heads",
        "attention_head_dim",
        "pooled_text_dim",
        "time_id_embedding_dim",
    )
    shape_fields = [f.name for f in fields(UNetConfig) if f.name not in unseen]
    for preset in UNET_PRESETS.values():
        if all(getattr(preset, name) == getattr(config, name) for name in shape_fields) and (
            addition_dim is None or preset.addition_embedding_dim == addition_dim
        ):
            return preset.with_changes(in_channels=config.in_channels)
    if addition_dim is not None:
        time_ids = config.time_ids_count * config.time_id_embedding_dim
        config = config.with_changes(pooled_text_dim=addition_dim - time_ids)
    if config.use_linear_projection and all(width % 64 == 0 for width in config.block_channels):
        return config.with_changes(attention_head_dim=64)  # SDXL and SD2 count heads by their width
    return config  # 8 heads everywhere, as SD1.5


def detect_family(config: UNetConfig, source: str = "checkpoint") -> str:
    """SD1.5 / SD1.5 inpainting / SDXL from a UNet config; a clear error for architectures we don't run."""
    sdxl = config.addition_embedding == "text_time"
    if config.context_dim == 1024 and not sdxl:
        raise CheckpointError(
            f"{source}: unsupported: this looks like SD2.x (cross-attention context 1024 from OpenCLIP ViT-H, "
            "usually v-prediction); supported are SD1.5 and SDXL"
        )
    if config.context_dim == 1280 and sdxl:
        raise CheckpointError(f"{source}: unsupported: this looks like the SDXL refiner (context 1280)")
    if config.in_channels not in (4, 9):
        raise CheckpointError(
            f"{source}: unsupported: a UNet with {config.in_channels} input channels "
            "(8: instruct-pix2pix); supported are 4 (text-to-image) and 9 (inpainting)"
        )
    family = "sdxl" if sdxl else "sd15"
    if config.in_channels == 9:
        return f"{family}_inpainting"
    return "sdxl_base" if sdxl else family


def _refuse_other_architectures(keys: list[str], source: str) -> None:
    def has(fragment: str) -> bool:
        return any(fragment in key for key in keys)

    if has("joint_blocks.") and has("context_block"):
        raise CheckpointError(
            f"{source}: unsupported: this looks like Stable Diffusion 3 (MMDiT joint_blocks.*)"
        )
    if has("double_blocks.") and has("single_blocks."):
        raise CheckpointError(
            f"{source}: unsupported: this looks like Flux (double_blocks.* / single_blocks.*)"
        )
    if any(key.startswith("cond_stage_model.model.") for key in keys):
        raise CheckpointError(
            f"{source}: unsupported: this looks like SD2.x (OpenCLIP text encoder cond_stage_model.model.*)"
        )
    if not any(key.startswith(LDM_UNET_PREFIX + "input_blocks.") for key in keys):
        preview = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
        raise CheckpointError(
            f"{source}: not a Stable Diffusion checkpoint: no UNet keys ({LDM_UNET_PREFIX}input_blocks.*); "
            f"it holds {len(keys)} tensors: {preview or 'none'}"
        )


def infer_autoencoder_config(
    shapes: Mapping[str, tuple[int, ...]], scaling_factor: float, source: str = "checkpoint"
) -> AutoencoderConfig:
    """An autoencoder config from LDM autoencoder key shapes (no prefix); `CheckpointError` if they form none."""
    keys = list(shapes)
    levels = _count(keys, r"encoder\.down\.(\d+)\.")
    if levels == 0 or "post_quant_conv.weight" not in shapes:
        raise CheckpointError(f"{source}: incomplete autoencoder (no encoder.down.* or post_quant_conv)")
    try:
        config = AutoencoderConfig(
            image_channels=shapes["encoder.conv_in.weight"][1],
            latent_channels=shapes["post_quant_conv.weight"][0],
            block_channels=tuple(
                shapes[f"encoder.down.{level}.block.0.conv1.weight"][0] for level in range(levels)
            ),
            layers_per_block=_count(keys, r"encoder\.down\.0\.block\.(\d+)\."),
            scaling_factor=scaling_factor,
        )
    except (KeyError, IndexError, TypeError, ValueError) as error:
        raise CheckpointError(
            f"{source}: the autoencoder key shapes form no SD autoencoder ({type(error).__name__}: {error})"
        ) from error
    sizes = (config.image_channels, config.latent_channels, config.layers_per_block, *config.block_channels)
    if min(sizes) <= 0:
        raise CheckpointError(f"{source}: the autoencoder key shapes give a zero width ({config})")
    return config


# -- Filling a meta model -----------------------------------------------------------------------------------


def _fill(
    model: fl.Chain,
    file: TensorFile,
    key_map: Mapping[str, str],
    prefix: str,
    what: str,
    device: Device | str,
    dtype: DType,
) -> None:
    """Load `file[prefix + their key]` into `model[our key]` for every entry of `key_map`; every key accounted for."""
    present = {key[len(prefix) :] for key in file.keys() if key.startswith(prefix)}
    missing = sorted(set(key_map) - present)
    unexpected = sorted(present - set(key_map))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {', '.join(prefix + k for k in missing[:10])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unmapped keys: {', '.join(prefix + k for k in unexpected[:10])}")
        raise CheckpointError(
            f"{file.path}: the {what} does not match its inferred architecture; " + "; ".join(parts)
        )
    expected = {key: value.shape for key, value in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    for theirs, ours in key_map.items():
        tensor = file.tensor(prefix + theirs)
        if tensor.shape != expected[ours]:
            if tensor.numel() != expected[ours].numel() or tensor.squeeze().shape != torch.Size(
                [d for d in expected[ours] if d != 1]
            ):
                raise CheckpointError(
                    f"{file.path}: {prefix + theirs} has shape {tuple(tensor.shape)}, "
                    f"the {what} expects {tuple(expected[ours])}"
                )
            tensor = tensor.reshape(expected[ours])  # attention stored as 1x1 convolutions in LDM files
        tensors[ours] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    model.load_state_dict(tensors, strict=True, assign=True)


def load_single_file(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    text_encoders: bool = True,
    unet_config: UNetConfig | None = None,
    text_encoder_configs: Mapping[str, CLIPTextConfig] | None = None,
) -> StableDiffusionCheckpoint:
    """An original (LDM/SGM layout) single-file checkpoint: UNet, autoencoder and, when asked, text encoders.

    `text_encoder_configs` ("clip_l", "clip_g") are for encoders whose heads and activation no preset of
    their shape gives (tiny test models); the real CLIP-L and OpenCLIP bigG are recognised by their shapes.
    """
    file = TensorFile(path)
    source = str(file.path)
    keys = file.keys()
    _refuse_other_architectures(keys, source)
    unet_shapes = {
        key[len(LDM_UNET_PREFIX) :]: file.shape(key) for key in keys if key.startswith(LDM_UNET_PREFIX)
    }
    config = unet_config or infer_unet_config(unet_shapes, source)
    family = detect_family(config, source)

    leftovers = [
        key
        for key in keys
        if not key.startswith(
            (LDM_UNET_PREFIX, LDM_AUTOENCODER_PREFIX, *TEXT_ENCODER_PREFIXES, *IGNORED_PREFIXES)
        )
        and key not in IGNORED_KEYS
    ]
    if leftovers:
        raise CheckpointError(
            f"{source}: {len(leftovers)} keys belong to no known part: {', '.join(leftovers[:10])}"
        )

    unet = UNet(config, device="meta")
    _fill(unet, file, ldm_unet_key_map(unet), LDM_UNET_PREFIX, f"{family} UNet", device, dtype)
    checkpoint = StableDiffusionCheckpoint(source=file.path, family=family, unet=unet)

    vae_shapes = {
        key[len(LDM_AUTOENCODER_PREFIX) :]: file.shape(key)
        for key in keys
        if key.startswith(LDM_AUTOENCODER_PREFIX)
    }
    if vae_shapes:
        scaling = (SDXL_AUTOENCODER if family.startswith("sdxl") else SD15_AUTOENCODER).scaling_factor
        autoencoder = LatentDiffusionAutoencoder(
            infer_autoencoder_config(vae_shapes, scaling, source), device="meta"
        )
        key_map = ldm_autoencoder_key_map(autoencoder)
        _fill(autoencoder, file, key_map, LDM_AUTOENCODER_PREFIX, "autoencoder", device, dtype)
        checkpoint.autoencoder = autoencoder

    if text_encoders and any(key.startswith(TEXT_ENCODER_PREFIXES) for key in keys):
        checkpoint.text_encoders = _load_single_file_text_encoders(
            file, family, device, dtype, text_encoder_configs or {}
        )
    return checkpoint


def _load_single_file_text_encoders(
    file: TensorFile,
    family: str,
    device: Device | str,
    dtype: DType,
    configs: Mapping[str, CLIPTextConfig],
) -> dict[str, fl.Chain]:
    """The text encoders under `cond_stage_model.*` / `conditioner.embedders.*`, loaded by foundationals.clip."""
    from ..clip.text_encoder import load_clip_text_encoder
    from ..formats.clip import TEXT_LAYOUTS

    layouts = (
        {"clip_l": "sdxl_clip_l", "clip_g": "sdxl_clip_g"}
        if family.startswith("sdxl")
        else {"clip_l": "sd15"}
    )
    encoders: dict[str, fl.Chain] = {}
    claimed: set[str] = set()
    for name, layout in layouts.items():
        owned = [key for key in file.keys() if TEXT_LAYOUTS[layout].owns(key)]
        claimed.update(owned)
        if owned:
            state_dict = {key: file.tensor(key) for key in owned}
            encoders[name] = load_clip_text_encoder(
                state_dict, layout, config=configs.get(name), device=device, dtype=dtype
            )
    unclaimed = [key for key in file.keys() if key.startswith(TEXT_ENCODER_PREFIXES) and key not in claimed]
    if unclaimed:
        raise CheckpointError(
            f"{file.path}: {len(unclaimed)} text-encoder keys fit no {family} text encoder: {', '.join(unclaimed[:10])}"
        )
    return encoders


# -- Diffusers folders --------------------------------------------------------------------------------------


def unet_config_from_diffusers(config: Mapping[str, Any], source: str = "config.json") -> UNetConfig:
    """Our UNet config from a diffusers `UNet2DConditionModel` config.json; `CheckpointError` if it gives none."""
    try:
        result = _unet_config_from_diffusers(config, source)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise CheckpointError(
            f"{source}: not a usable diffusers UNet config ({type(error).__name__}: {error})"
        ) from error
    for option in fields(result):  # sizes must be positive ints (depths may be 0): no bools, strings, floats
        value = getattr(result, option.name)
        if option.name in ("use_linear_projection", "addition_embedding") or (
            option.name == "attention_head_dim" and value is None
        ):
            continue
        values = value if isinstance(value, tuple) else (value,)
        minimum = 0 if "depth" in option.name else 1
        if not values or not all(type(v) is int and v >= minimum for v in values):
            raise CheckpointError(f"{source}: UNet option {option.name}={value!r} is not a valid size")
    return result


def _unet_config_from_diffusers(config: Mapping[str, Any], source: str) -> UNetConfig:
    for name, allowed in (
        ("class_embed_type", None),
        ("encoder_hid_dim_type", None),
        ("time_cond_proj_dim", None),
    ):
        if config.get(name, allowed) != allowed:
            raise CheckpointError(f"{source}: unsupported UNet option {name}={config[name]!r}")
    if (
        config.get("resnet_time_scale_shift", "default") != "default"
        or config.get("upcast_attention") is True
    ):
        raise CheckpointError(
            f"{source}: unsupported UNet options (time scale shift / upcast attention: SD2-like)"
        )
    channels = tuple(config["block_out_channels"])
    levels = len(channels)
    attention = [block.startswith("CrossAttn") for block in config["down_block_types"]]
    per_block = config.get("transformer_layers_per_block", 1)
    depths = [per_block] * levels if isinstance(per_block, int) else list(per_block)
    heads = config.get("num_attention_heads") or config.get(
        "attention_head_dim", 8
    )  # diffusers' naming quirk
    heads = [heads] * levels if isinstance(heads, int) else list(heads)
    head_widths = {width // count for width, count in zip(channels, heads)}
    if len(set(heads)) > 1 and len(head_widths) > 1:
        raise CheckpointError(
            f"{source}: heads {heads} are neither the same count nor the same width per level"
        )
    context = config.get("cross_attention_dim", 768)
    head_fields: dict[str, Any] = (
        {"num_attention_heads": heads[0]}
        if len(set(heads)) == 1
        else {"attention_head_dim": head_widths.pop()}
    )
    result = UNetConfig(
        in_channels=config.get("in_channels", 4),
        out_channels=config.get("out_channels", 4),
        block_channels=channels,
        layers_per_block=config.get("layers_per_block", 2),
        transformer_depth=tuple(depth if on else 0 for depth, on in zip(depths, attention)),
        middle_transformer_depth=depths[-1],
        context_dim=context if isinstance(context, int) else context[0],
        use_linear_projection=bool(config.get("use_linear_projection", False)),
        num_groups=config.get("norm_num_groups", 32),
        **head_fields,
    )
    embed_type = config.get("addition_embed_type")
    if embed_type == "text_time":
        time_dim = config["addition_time_embed_dim"]
        pooled = config["projection_class_embeddings_input_dim"] - result.time_ids_count * time_dim
        result = result.with_changes(
            addition_embedding="text_time", time_id_embedding_dim=time_dim, pooled_text_dim=pooled
        )
    elif embed_type is not None:
        raise CheckpointError(f"{source}: unsupported addition_embed_type {embed_type!r}")
    return result


def autoencoder_config_from_diffusers(config: Mapping[str, Any]) -> AutoencoderConfig:
    """Our autoencoder config from a diffusers `AutoencoderKL` config.json."""
    return AutoencoderConfig(
        image_channels=config.get("in_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_channels=tuple(config["block_out_channels"]),
        layers_per_block=config.get("layers_per_block", 2),
        num_groups=config.get("norm_num_groups", 32),
        scaling_factor=config.get("scaling_factor", 0.18215),
    )


def _component_file(folder: Path) -> TensorFile:
    for name in (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.fp16.bin",
    ):
        if (folder / name).is_file():
            return TensorFile(folder / name)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(f"{folder}: no diffusion_pytorch_model weights; it holds {present or 'nothing'}")


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder}: no config.json")
    return json.loads(path.read_text())


def load_diffusers_folder(
    folder: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    text_encoders: bool = True,
) -> StableDiffusionCheckpoint:
    """A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`)."""
    folder = Path(folder)
    config = unet_config_from_diffusers(_read_config(folder / "unet"), str(folder / "unet" / "config.json"))
    family = detect_family(config, str(folder))
    unet = UNet(config, device="meta")
    _fill(
        unet,
        _component_file(folder / "unet"),
        diffusers_unet_key_map(unet),
        "",
        f"{family} UNet",
        device,
        dtype,
    )
    checkpoint = StableDiffusionCheckpoint(source=folder, family=family, unet=unet)
    if (folder / "vae").is_dir():
        autoencoder = LatentDiffusionAutoencoder(
            autoencoder_config_from_diffusers(_read_config(folder / "vae")), device="meta"
        )
        key_map = diffusers_autoencoder_key_map(autoencoder)
        _fill(autoencoder, _component_file(folder / "vae"), key_map, "", "autoencoder", device, dtype)
        checkpoint.autoencoder = autoencoder
    if text_encoders:
        from ..clip.text_encoder import load_clip_text_encoder_from_folder

        for name, subfolder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            if (folder / subfolder).is_dir():
                checkpoint.text_encoders[name] = load_clip_text_encoder_from_folder(
                    folder / subfolder, device=device, dtype=dtype
                )
    return checkpoint


def load_checkpoint(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    text_encoders: bool = True,
    text_encoder_configs: Mapping[str, CLIPTextConfig] | None = None,
) -> StableDiffusionCheckpoint:
    """A single file or a diffusers folder, whichever `path` is (`text_encoder_configs`: single files only)."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, device, dtype, text_encoders)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    return load_single_file(path, device, dtype, text_encoders, text_encoder_configs=text_encoder_configs)
