"""Reading a ControlNet file (lllyasviel or diffusers layout) into a `ControlNet`, checked against the base UNet,
and a Control-LoRA file into a `ControlLora` (its ControlNet is made from the UNet it is applied to).

A diffusers-layout file with control types (`control_add_embedding.*`, `task_embedding`: ControlNet Union /
ProMax) becomes a `UnionControlNet`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ....formats.controlnet import (
    CONTROL_LORA_EXPECTED,
    CONTROLNET_EXPECTED,
    DIFFUSERS_WEIGHT_NAMES,
    UNION_WEIGHT_NAMES,
    control_lora_entries,
    control_lora_shapes,
    controlnet_layout,
    diffusers_controlnet_key_map,
    diffusers_union_key_map,
    hint_channels_from_shapes,
    is_control_lora,
    is_union_controlnet,
    ldm_shapes_from_diffusers,
    lllyasviel_controlnet_key_map,
    union_sizes_from_shapes,
    union_source_key,
)
from ....formats.ldm import CheckpointError, infer_unet_config
from ....model_files import ModelFileError, describe_keys, describe_model_kind, read_header, read_state_dict
from ...model_config import UNetConfig, unet_family
from ...unet import UNet
from .control_lora import ControlLora
from .model import ControlMismatchError, ControlNet, ControlNetConfig, check_controlnet_fits
from .union import UnionControlNet, UnionControlNetConfig


def load_controlnet(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    base: UNetConfig | None = None,
    unet: UNet | None = None,
) -> ControlNet:
    """A ControlNet file (lllyasviel or diffusers layout; architecture from its shapes), checked against `base`.

    A Control-LoRA file needs `unet`, the UNet it is applied to: its ControlNet is that UNet's encoder plus the
    file's deltas (see `control_lora`), on the UNet's compute device and dtype.
    """
    path = Path(path)
    if path.is_dir():  # a diffusers ControlNet folder: its weights file (the config is read from the shapes)
        names = DIFFUSERS_WEIGHT_NAMES + UNION_WEIGHT_NAMES
        weights = [path / name for name in names if (path / name).is_file()]
        path = weights[0] if weights else path
    header = read_header(path, what="ControlNet")
    keys = list(header)
    if is_control_lora(keys):
        if unet is None:
            found = (
                "a Control-LoRA (key lora_controlnet): its ControlNet is the UNet's encoder plus this file's "
                "deltas, and no UNet was given to build it from"
            )
            raise ModelFileError(
                path, "ControlNet", found, "the UNet it is applied to (unet=), or Fluxion Apply Control"
            )
        control_lora = load_control_lora(path, device, dtype)
        try:
            return control_lora.controlnet(unet)
        except ControlMismatchError as error:
            found = str(error)
            raise ModelFileError(
                path, "Control-LoRA", found, f"a Control-LoRA for {unet_family(unet.config)}"
            ) from error
    layout = controlnet_layout(keys)
    if layout is None:
        found = f"this is {describe_model_kind(keys)}, not a ControlNet ({describe_keys(keys)})"
        raise ModelFileError(path, "ControlNet", found, CONTROLNET_EXPECTED)
    kind, prefix = layout
    shapes = {key[len(prefix) :]: spec.shape for key, spec in header.items() if key.startswith(prefix)}
    ldm_shapes = shapes if kind == "lllyasviel" else ldm_shapes_from_diffusers(shapes)
    try:
        in_channels = ldm_shapes["input_blocks.0.0.weight"][1]
        unet_config = infer_unet_config({**ldm_shapes, "out.2.weight": (in_channels,)}, str(path))
        conditioning_channels, hint_channels = hint_channels_from_shapes(shapes, kind)
    except (KeyError, IndexError, CheckpointError) as error:
        found = f"an incomplete {kind}-layout ControlNet ({error})"
        raise ModelFileError(path, "ControlNet", found, CONTROLNET_EXPECTED) from error
    config = ControlNetConfig(unet_config, conditioning_channels, hint_channels)
    if base is not None:
        try:
            check_controlnet_fits(config, base)
        except ControlMismatchError as error:
            raise ModelFileError(
                path, "ControlNet", str(error), f"a ControlNet for {unet_family(base)}"
            ) from error
        heads = {
            "num_attention_heads": base.num_attention_heads,
            "attention_head_dim": base.attention_head_dim,
        }
        config = ControlNetConfig(unet_config.with_changes(**heads), conditioning_channels, hint_channels)
    controlnet: ControlNet
    if kind == "diffusers" and is_union_controlnet(keys):
        kind = "diffusers union"
        types, type_dim, layers = union_sizes_from_shapes(shapes)
        controlnet = UnionControlNet(UnionControlNetConfig(config, types, type_dim, layers), device="meta")
        key_map = diffusers_union_key_map(controlnet)
    else:
        controlnet = ControlNet(config, device="meta")
        key_map = (lllyasviel_controlnet_key_map if kind == "lllyasviel" else diffusers_controlnet_key_map)(
            controlnet
        )
    sources = {union_source_key(key)[0] for key in key_map}
    missing = sorted(sources - set(shapes))
    unmapped = sorted(set(shapes) - sources)
    if missing or unmapped:
        found = f"{kind}-layout keys that do not fit the inferred architecture: " + "; ".join(
            part
            for part in (
                f"{len(missing)} missing ({', '.join(prefix + k for k in missing[:5])})" if missing else "",
                f"{len(unmapped)} unmapped ({', '.join(prefix + k for k in unmapped[:5])})"
                if unmapped
                else "",
            )
            if part
        )
        raise ModelFileError(path, "ControlNet", found, CONTROLNET_EXPECTED)
    tensors = read_state_dict(
        path, what="ControlNet", device=device, dtype=dtype, keys=[prefix + k for k in sorted(sources)]
    )
    expected = {key: value.shape for key, value in controlnet.state_dict().items()}
    state: dict[str, Tensor] = {}
    for theirs, ours in key_map.items():
        theirs, third = union_source_key(theirs)
        tensor = tensors[prefix + theirs]
        if third is not None:  # one of query, key, value of a stacked in-projection
            if tensor.shape[0] % 3:
                found = f"{prefix + theirs} has shape {tuple(tensor.shape)}"
                raise ModelFileError(
                    path, "ControlNet", found, "a query/key/value in-projection (3 x width rows)"
                )
            tensor = tensor.chunk(3)[third]
        if tensor.shape != expected[ours]:
            if tensor.numel() != expected[ours].numel():
                found = f"{prefix + theirs} has shape {tuple(tensor.shape)}"
                raise ModelFileError(path, "ControlNet", found, f"shape {tuple(expected[ours])}")
            tensor = tensor.reshape(expected[ours])  # attention projections stored as 1x1 convolutions
        state[ours] = tensor
    controlnet.load_state_dict(state, strict=True, assign=True)
    return controlnet


def union_controlnet_tensors(controlnet: UnionControlNet) -> dict[str, Tensor]:
    """A union ControlNet's tensors under diffusers `ControlNetUnionModel` names (the public release's layout)."""
    state = controlnet.state_dict()
    thirds: dict[str, dict[int, Tensor]] = {}
    tensors: dict[str, Tensor] = {}
    for theirs, ours in diffusers_union_key_map(controlnet).items():
        name, third = union_source_key(theirs)
        if third is None:
            tensors[name] = state[ours]
        else:
            thirds.setdefault(name, {})[third] = state[ours]
    for name, parts in thirds.items():
        tensors[name] = torch.cat([parts[index] for index in sorted(parts)])
    return tensors


def load_control_lora(
    path: str | Path, device: Device | str = "cpu", dtype: DType = torch.float32
) -> ControlLora:
    """A Control-LoRA file (Stability's layout) on our ControlNet's keys; its architecture from its shapes.

    Every applied key (see `formats.controlnet.control_lora_entries`) must fit the ControlNet the shapes describe,
    and the ControlNet's own layers (hint encoder, zero convolutions) must be in the file: the UNet has none."""
    path = Path(path)
    header = read_header(path, what="Control-LoRA")
    keys = list(header)
    if not is_control_lora(keys):
        found = f"this is {describe_model_kind(keys)}, not a Control-LoRA ({describe_keys(keys)})"
        raise ModelFileError(path, "Control-LoRA", found, CONTROL_LORA_EXPECTED)
    shapes = control_lora_shapes({key: tuple(spec.shape) for key, spec in header.items()})
    try:
        in_channels = shapes["input_blocks.0.0.weight"][1]
        unet_config = infer_unet_config({**shapes, "out.2.weight": (in_channels,)}, str(path))
        conditioning_channels, hint_channels = hint_channels_from_shapes(shapes, "lllyasviel")
    except (KeyError, IndexError, CheckpointError) as error:
        found = f"an incomplete Control-LoRA ({error})"
        raise ModelFileError(path, "Control-LoRA", found, CONTROL_LORA_EXPECTED) from error
    config = ControlNetConfig(unet_config, conditioning_channels, hint_channels)
    controlnet = ControlNet(config, device="meta")
    key_map = lllyasviel_controlnet_key_map(controlnet)
    expected = {key: value.shape for key, value in controlnet.state_dict().items()}
    entries = control_lora_entries(keys)
    target = {
        key: (key.rpartition(".")[0] + ".weight" if kind in ("up", "down") else key)
        for key, kind in entries.items()
    }
    unmapped = sorted(key for key, theirs in target.items() if theirs not in key_map)
    own = set(expected) - set(UNet(unet_config, device="meta").state_dict())
    missing = sorted(theirs for theirs, ours in key_map.items() if ours in own and theirs not in shapes)
    if missing or unmapped:
        found = "Control-LoRA keys that do not fit the architecture its shapes describe: " + "; ".join(
            part
            for part in (
                f"{len(missing)} of the ControlNet's own missing ({', '.join(missing[:5])})"
                if missing
                else "",
                f"{len(unmapped)} unmapped ({', '.join(unmapped[:5])})" if unmapped else "",
            )
            if part
        )
        raise ModelFileError(path, "Control-LoRA", found, CONTROL_LORA_EXPECTED)
    tensors = read_state_dict(path, what="Control-LoRA", device=device, dtype=dtype, keys=list(entries))
    full: dict[str, Tensor] = {}
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for key, kind in entries.items():
        ours = key_map[target[key]]
        if kind == "down":
            continue
        if kind == "up":
            down_key = key.rpartition(".")[0] + ".down"
            if down_key not in tensors:
                raise ModelFileError(path, "Control-LoRA", f"{key} has no {down_key}", "up/down pairs")
            up, down = tensors[key], tensors[down_key]
            if (
                up.shape[0] * down[0].numel() != expected[ours].numel()
                or up.flatten(1).shape[1] != down.shape[0]
            ):
                found = f"{key} / {down_key} of shapes {tuple(up.shape)} / {tuple(down.shape)}"
                raise ModelFileError(
                    path, "Control-LoRA", found, f"a pair for a weight of shape {tuple(expected[ours])}"
                )
            pairs[ours] = (up, down)
            continue
        tensor = tensors[key]
        if tensor.shape != expected[ours]:
            if tensor.numel() != expected[ours].numel():
                found = f"{key} has shape {tuple(tensor.shape)}"
                raise ModelFileError(path, "Control-LoRA", found, f"shape {tuple(expected[ours])}")
            tensor = tensor.reshape(expected[ours])
        full[ours] = tensor
    orphans = sorted(
        key for key, kind in entries.items() if kind == "down" and key_map[target[key]] not in pairs
    )
    if orphans:
        raise ModelFileError(path, "Control-LoRA", f"{orphans[0]} has no .up", "up/down pairs")
    return ControlLora(config, full, pairs)
