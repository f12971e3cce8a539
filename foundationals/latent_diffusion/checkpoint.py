"""Load Stable Diffusion checkpoints as users have them: original single files and diffusers folders.

- Single files (`.safetensors`, or `.ckpt/.pt/.pth/.bin` read with `torch.load(weights_only=True)`, a
  nested `state_dict` unwrapped) in the original LDM/SGM layout: `model.diffusion_model.*` (UNet),
  `first_stage_model.*` (autoencoder), `cond_stage_model.*` / `conditioner.embedders.*` (text encoders,
  handed to `foundationals.clip`).
- EMA: like ComfyUI (and diffusers' default), the UNet comes from `model.diffusion_model.*`; `model_ema.*`
  copies in full training checkpoints are skipped. "emaonly" files already hold the EMA weights there.
- Diffusers folders: `unet/`, `vae/` (`config.json` + `diffusion_pytorch_model[.fp16].safetensors|.bin`),
  `text_encoder/`, `text_encoder_2/`.
- How to sample: a single file's empty `v_pred` / `ztsnr` marker tensors (see `formats.ldm.SAMPLING_MARKER_KEYS`),
  a folder's `scheduler/scheduler_config.json` (`prediction_type`, `rescale_betas_zero_snr`).

Architectures are inferred from key names and tensor shapes (tiny test checkpoints load too); the family
(SD1.5, SD1.5 inpainting, SDXL) is detected, and SD2.x, SDXL refiner, SD3, Flux and unknown files are
refused with an error naming the file. Models are built on the meta device and loaded with
`load_state_dict(assign=True)`, tensors converted to the requested dtype (default float32) as they are
read: no random init and no second copy of fp32 weights. Every unmapped or missing key is an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ...fluxion import layers as fl
from ..clip.config import CLIPTextConfig
from ..formats.diffusers import (
    autoencoder_config_from_diffusers,
    diffusers_autoencoder_key_map,
    diffusers_unet_key_map,
    unet_config_from_diffusers,
)
from ..formats.ldm import (
    IGNORED_KEYS,
    IGNORED_PREFIXES,
    LDM_AUTOENCODER_PREFIX,
    LDM_UNET_PREFIX,
    SAMPLING_MARKER_KEYS,
    TEXT_ENCODER_PREFIXES,
    CheckpointError,
    detect_family,
    infer_autoencoder_config,
    infer_unet_config,
    ldm_autoencoder_key_map,
    ldm_unet_key_map,
    refuse_other_architectures,
    sampling_markers,
)
from .auto_encoder import LatentDiffusionAutoencoder
from .model_config import (
    SD15_AUTOENCODER,
    SDXL_AUTOENCODER,
    UNetConfig,
)
from .solvers.solver import PredictionType
from .unet import UNet

TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


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
    prediction_type: PredictionType = PredictionType.EPSILON
    zero_terminal_snr: bool = False
    """How the UNet was trained: from a single file's `v_pred` / `ztsnr` marker keys, or a diffusers folder's
    `scheduler/scheduler_config.json` (`prediction_type`, `rescale_betas_zero_snr`)."""


ComponentPlacement = Mapping[str, tuple[Device | str, DType]]
"""Device and dtype per part of a checkpoint ("unet", "autoencoder", "text_encoders"); a part left out takes
the loader's `device` and `dtype`."""
PARTS = ("unet", "autoencoder", "text_encoders")


def _where(
    placement: ComponentPlacement | None, part: str, device: Device | str, dtype: DType
) -> tuple[Device | str, DType]:
    if placement is None:
        return device, dtype
    unknown = set(placement) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; the parts are {', '.join(PARTS)}")
    return placement.get(part, (device, dtype))


# -- Filling a meta model -----------------------------------------------------------------------------------


def _owned_copy(tensor: Tensor, device: Device | str, dtype: DType) -> Tensor:
    """`tensor` on `device`, floating point in `dtype`: always a copy, even when nothing converts, since a tensor
    viewing the memory-mapped file would keep the whole mapping (every page read so far) resident for as long
    as the model lives."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None, copy=True)


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
        tensors[ours] = _owned_copy(tensor, device, dtype)
    model.load_state_dict(tensors, strict=True, assign=True)


def load_single_file(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    text_encoders: bool = True,
    unet_config: UNetConfig | None = None,
    text_encoder_configs: Mapping[str, CLIPTextConfig] | None = None,
    placement: ComponentPlacement | None = None,
) -> StableDiffusionCheckpoint:
    """An original (LDM/SGM layout) single-file checkpoint: UNet, autoencoder and, when asked, text encoders.

    `text_encoder_configs` ("clip_l", "clip_g") are for encoders whose heads and activation no preset of
    their shape gives (tiny test models); the real CLIP-L and OpenCLIP bigG are recognised by their shapes.
    `placement` loads parts on their own device and dtype (each tensor converted once, as it is read).
    """
    file = TensorFile(path)
    source = str(file.path)
    keys = file.keys()
    refuse_other_architectures(keys, source)
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
        and key not in SAMPLING_MARKER_KEYS
    ]
    if leftovers:
        raise CheckpointError(
            f"{source}: {len(leftovers)} keys belong to no known part: {', '.join(leftovers[:10])}"
        )

    unet = UNet(config, device="meta")
    _fill(
        unet,
        file,
        ldm_unet_key_map(unet),
        LDM_UNET_PREFIX,
        f"{family} UNet",
        *_where(placement, "unet", device, dtype),
    )
    v_prediction, zero_terminal_snr = sampling_markers(keys)
    checkpoint = StableDiffusionCheckpoint(
        source=file.path,
        family=family,
        unet=unet,
        prediction_type=PredictionType.V_PREDICTION if v_prediction else PredictionType.EPSILON,
        zero_terminal_snr=zero_terminal_snr,
    )

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
        where = _where(placement, "autoencoder", device, dtype)
        _fill(autoencoder, file, key_map, LDM_AUTOENCODER_PREFIX, "autoencoder", *where)
        checkpoint.autoencoder = autoencoder

    if text_encoders and any(key.startswith(TEXT_ENCODER_PREFIXES) for key in keys):
        checkpoint.text_encoders = _load_single_file_text_encoders(
            file, family, *_where(placement, "text_encoders", device, dtype), text_encoder_configs or {}
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
            state_dict = {key: _owned_copy(file.tensor(key), device, dtype) for key in owned}
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


def read_scheduler_config(folder: Path) -> tuple[PredictionType, bool]:
    """(prediction type, zero terminal SNR) from a diffusers folder's scheduler config (defaults without one)."""
    path = folder / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return PredictionType.EPSILON, False
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from error
    prediction = config.get("prediction_type", "epsilon")
    try:
        prediction_type = PredictionType(prediction)
    except ValueError:
        choices = ", ".join(kind.value for kind in PredictionType)
        raise CheckpointError(f"{path}: prediction_type {prediction!r} is none of {choices}") from None
    return prediction_type, bool(config.get("rescale_betas_zero_snr", False))


def load_diffusers_folder(
    folder: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    text_encoders: bool = True,
    placement: ComponentPlacement | None = None,
) -> StableDiffusionCheckpoint:
    """A diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `text_encoder_2/`); `placement` as for
    `load_single_file`."""
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
        *_where(placement, "unet", device, dtype),
    )
    prediction_type, zero_terminal_snr = read_scheduler_config(folder)
    checkpoint = StableDiffusionCheckpoint(
        source=folder,
        family=family,
        unet=unet,
        prediction_type=prediction_type,
        zero_terminal_snr=zero_terminal_snr,
    )
    if (folder / "vae").is_dir():
        autoencoder = LatentDiffusionAutoencoder(
            autoencoder_config_from_diffusers(_read_config(folder / "vae")), device="meta"
        )
        key_map = diffusers_autoencoder_key_map(autoencoder)
        where = _where(placement, "autoencoder", device, dtype)
        _fill(autoencoder, _component_file(folder / "vae"), key_map, "", "autoencoder", *where)
        checkpoint.autoencoder = autoencoder
    if text_encoders:
        from ..clip.text_encoder import load_clip_text_encoder_from_folder

        text_device, text_dtype = _where(placement, "text_encoders", device, dtype)
        for name, subfolder in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
            if (folder / subfolder).is_dir():
                checkpoint.text_encoders[name] = load_clip_text_encoder_from_folder(
                    folder / subfolder, device=text_device, dtype=text_dtype
                )
    return checkpoint


def load_checkpoint(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    text_encoders: bool = True,
    text_encoder_configs: Mapping[str, CLIPTextConfig] | None = None,
    placement: ComponentPlacement | None = None,
) -> StableDiffusionCheckpoint:
    """A single file or a diffusers folder, whichever `path` is (`text_encoder_configs`: single files only;
    `placement`: each part's own device and dtype)."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, device, dtype, text_encoders, placement=placement)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or folder")
    return load_single_file(
        path, device, dtype, text_encoders, text_encoder_configs=text_encoder_configs, placement=placement
    )
