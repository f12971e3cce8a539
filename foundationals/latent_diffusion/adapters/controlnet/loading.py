"""Reading a ControlNet file (lllyasviel or diffusers layout) into a `ControlNet`, checked against the base UNet.

A diffusers-layout file with control types (`control_add_embedding.*`, `task_embedding`: ControlNet Union /
ProMax) becomes a `UnionControlNet`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ....formats.controlnet import (
    CONTROLNET_EXPECTED,
    DIFFUSERS_WEIGHT_NAMES,
    UNION_WEIGHT_NAMES,
    controlnet_layout,
    diffusers_controlnet_key_map,
    diffusers_union_key_map,
    hint_channels_from_shapes,
    is_union_controlnet,
    ldm_shapes_from_diffusers,
    lllyasviel_controlnet_key_map,
    union_sizes_from_shapes,
    union_source_key,
)
from ....formats.ldm import CheckpointError, infer_unet_config
from ....model_files import ModelFileError, describe_keys, describe_model_kind, read_header, read_state_dict
from ...model_config import UNetConfig, unet_family
from .model import ControlMismatchError, ControlNet, ControlNetConfig, check_controlnet_fits
from .union import UnionControlNet, UnionControlNetConfig


def load_controlnet(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    base: UNetConfig | None = None,
) -> ControlNet:
    """A ControlNet file (lllyasviel or diffusers layout; architecture from its shapes), checked against `base`."""
    path = Path(path)
    if path.is_dir():  # a diffusers ControlNet folder: its weights file (the config is read from the shapes)
        names = DIFFUSERS_WEIGHT_NAMES + UNION_WEIGHT_NAMES
        weights = [path / name for name in names if (path / name).is_file()]
        path = weights[0] if weights else path
    header = read_header(path, what="ControlNet")
    keys = list(header)
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
