"""Reading a T2I-Adapter file (TencentARC or diffusers layout) into a `T2IAdapter`: its config from the key shapes."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import device as Device
from torch import dtype as DType

from ....formats.t2i_adapter import T2I_EXPECTED, t2i_adapter_key_map
from ....model_files import ModelFileError, describe_keys, describe_model_kind, read_header, read_state_dict
from ...model_config import UNetConfig, unet_family
from ..controlnet import ControlMismatchError
from .model import T2IAdapter, T2IAdapterConfig, check_adapter_fits


def infer_t2i_config(
    shapes: dict[str, tuple[int, ...]], source: str = "T2I-Adapter"
) -> tuple[T2IAdapterConfig, str]:
    """The adapter config and layout ("tencentarc" or "diffusers") from a file's key shapes."""
    diffusers = any(key.startswith("adapter.") for key in shapes)
    layout = "diffusers" if diffusers else "tencentarc"
    shapes = {key.removeprefix("adapter."): shape for key, shape in shapes.items()}
    in_conv = [key for key in shapes if key.endswith("in_conv.weight")]
    light = "conv_in.weight" not in shapes
    body = sorted({int(key.split(".")[1]) for key in shapes if key.startswith("body.")})
    if light:
        levels = len(body)
        blocks_key = "resnets" if diffusers else "body"
        num_res = len({key.split(".")[3] for key in shapes if key.startswith(f"body.0.{blocks_key}.")})
        channels = tuple(shapes[f"body.{level}.out_conv.weight"][0] for level in range(levels))
        unshuffled = shapes["body.0.in_conv.weight"][1]
        kind = "light"
    else:
        unshuffled = shapes["conv_in.weight"][1]
        if diffusers:
            levels = len(body)
            num_res = len({key.split(".")[3] for key in shapes if key.startswith("body.0.resnets.")})
            block1 = [shapes[f"body.{level}.resnets.0.block1.weight"][0] for level in range(levels)]
        else:
            in_conv_levels = sorted(int(key.split(".")[1]) for key in in_conv)
            num_res = in_conv_levels[0] if in_conv_levels else len(body)
            levels = len(body) // num_res
            block1 = [shapes[f"body.{level * num_res}.block1.weight"][0] for level in range(levels)]
        channels = tuple(block1)
        kernel = shapes["body.0.resnets.0.block2.weight" if diffusers else "body.0.block2.weight"][-1]
        if kernel != 1 or any("skep" in key or "down_opt" in key for key in shapes):
            raise ModelFileError(
                source,
                "T2I-Adapter",
                "an adapter variant with 3x3 skip/downsample convolutions",
                "the released full adapters (1x1 second convolution, average-pool downsampling)",
            )
        kind = "full"
    in_channels = 3 if unshuffled % 3 == 0 else 1
    factor = round((unshuffled // in_channels) ** 0.5)
    if (
        kind == "full" and factor == 16
    ):  # SDXL adapters unshuffle 16x (TencentARC's Adapter_XL, ComfyUI's rule)
        kind = "full_xl"
    return T2IAdapterConfig(kind, channels, num_res, in_channels, factor), layout


def load_t2i_adapter(
    path: str | Path,
    device: Device | str = "cpu",
    dtype: DType = torch.float32,
    base: UNetConfig | None = None,
) -> T2IAdapter:
    """A T2I-Adapter file (TencentARC or diffusers layout), checked against the base UNet when given."""
    header = read_header(path, what="T2I-Adapter")
    keys = list(header)
    if (
        not any(key.startswith(("body.", "adapter.body.")) for key in keys)
        or describe_model_kind(keys) == "a LoRA"
    ):
        found = f"this is {describe_model_kind(keys)}, not a T2I-Adapter ({describe_keys(keys)})"
        raise ModelFileError(path, "T2I-Adapter", found, T2I_EXPECTED)
    try:
        config, layout = infer_t2i_config({key: spec.shape for key, spec in header.items()}, str(path))
    except (KeyError, IndexError, ValueError) as error:
        if isinstance(error, ModelFileError):
            raise
        raise ModelFileError(
            path, "T2I-Adapter", f"an incomplete T2I-Adapter ({error})", T2I_EXPECTED
        ) from error
    if base is not None:
        try:
            check_adapter_fits(config, base)
        except ControlMismatchError as error:
            raise ModelFileError(
                path, "T2I-Adapter", str(error), f"a T2I-Adapter for {unet_family(base)}"
            ) from error
    adapter = T2IAdapter(config, device="meta")
    key_map = t2i_adapter_key_map(adapter, layout)
    missing, unmapped = sorted(set(key_map) - set(keys)), sorted(set(keys) - set(key_map))
    if missing or unmapped:
        found = (
            f"keys that do not fit a {config.kind} adapter: missing {missing[:5]}, unmapped {unmapped[:5]}"
        )
        raise ModelFileError(path, "T2I-Adapter", found, T2I_EXPECTED)
    tensors = read_state_dict(path, what="T2I-Adapter", device=device, dtype=dtype, keys=list(key_map))
    adapter.load_state_dict(
        {ours: tensors[theirs] for theirs, ours in key_map.items()}, strict=True, assign=True
    )
    return adapter
