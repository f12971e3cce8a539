"""Reading an IP-Adapter file (tencent-ailab or diffusers layout) into an `IPAdapter`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ....formats.ip_adapter import (
    BASE,
    DIFFUSERS,
    FACEID,
    FACEID_PLUS,
    detect_ip_adapter_layout,
    diffusers_to_tencent,
    plus_depth,
    projection_kind,
    tencent_key_value_weights,
    tencent_projection_to_ours,
)
from ....model_files import ModelFileError, read_state_dict

if TYPE_CHECKING:
    pass

from .adapter import IPAdapter
from .model import FaceIDPlusProjection, FaceIDProjection, ImageProjection, PerceiverResampler

FACEID_V2_NAMES = ("plusv2", "plus_v2", "plus-v2")
"""FaceID Plus v1 and v2 files hold the same keys; v2 (the shortcut) is told by the release's file name, as
ComfyUI_IPAdapter_plus does (`ip-adapter-faceid-plusv2_sd15.bin`)."""


def _faceid_projection(image_proj: dict[str, Tensor], kind: str) -> FaceIDProjection | FaceIDPlusProjection:
    first, second = image_proj["proj.0.weight"], image_proj["proj.2.weight"]
    width = int(image_proj["norm.weight"].shape[0])
    tokens = int(second.shape[0]) // width
    if kind == FACEID:
        return FaceIDProjection(int(first.shape[1]), int(first.shape[0]), width, tokens, device="meta")
    resampler = {
        key.removeprefix("perceiver_resampler."): value
        for key, value in image_proj.items()
        if key.startswith("perceiver_resampler.")
    }
    return FaceIDPlusProjection(
        face_embedding_dim=int(first.shape[1]),
        hidden_dim=int(first.shape[0]),
        clip_hidden_dim=int(resampler["proj_in.weight"].shape[1]),
        dim=width,
        output_dim=int(resampler["proj_out.weight"].shape[0]),
        inner_dim=int(resampler["layers.0.0.to_q.weight"].shape[0]),
        num_tokens=tokens,
        depth=plus_depth(resampler),
        device="meta",
    )


def ip_adapter_from_state_dict(
    state_dict: dict[str, Tensor],
    name: str = "ip-adapter",
    device: Device | str | None = None,
    dtype: DType | None = None,
    faceid_v2: bool | None = None,
) -> IPAdapter:
    """An `IPAdapter` from tensors in the tencent-ailab or diffusers layout (see `formats.ip_adapter`).

    FaceID Plus: `faceid_v2` (None: from `name`, see `FACEID_V2_NAMES`) turns the v2 shortcut on."""
    layout = detect_ip_adapter_layout(list(state_dict))
    if layout is None:
        raise ValueError(
            f"{name}: not an IP-Adapter (expected image_proj.* and ip_adapter.N.to_k_ip/to_v_ip, or a diffusers "
            f"UNet's encoder_hid_proj.* and *.attn2.processor.to_k_ip.0; found {sorted(state_dict)[:4]} ...)"
        )
    if layout == DIFFUSERS:
        state_dict = diffusers_to_tencent(state_dict)
    image_proj = {
        key.removeprefix("image_proj."): value
        for key, value in state_dict.items()
        if key.startswith("image_proj.")
    }
    kind = projection_kind(image_proj)
    key_values = tencent_key_value_weights(state_dict)
    if kind in (FACEID, FACEID_PLUS):
        projection: ImageProjection | PerceiverResampler | FaceIDProjection | FaceIDPlusProjection
        projection = _faceid_projection(image_proj, kind)
    elif kind == BASE:
        context_dim = int(image_proj["norm.weight"].shape[0])
        weight = image_proj["proj.weight"]
        projection = ImageProjection(
            int(weight.shape[1]), context_dim, int(weight.shape[0]) // context_dim, device="meta"
        )
    else:
        queries, dim = image_proj["latents"].shape[-2:]
        projection = PerceiverResampler(
            embedding_dim=int(image_proj["proj_in.weight"].shape[1]),
            dim=int(dim),
            output_dim=int(image_proj["proj_out.weight"].shape[0]),
            num_queries=int(queries),
            inner_dim=int(image_proj["layers.0.0.to_q.weight"].shape[0]),
            depth=plus_depth(image_proj),
            device="meta",
        )
    tensors = tencent_projection_to_ours(image_proj)
    if device is not None or dtype is not None:
        tensors = {key: value.to(device=device, dtype=dtype) for key, value in tensors.items()}
        key_values = [
            (k.to(device=device, dtype=dtype), v.to(device=device, dtype=dtype)) for k, v in key_values
        ]
    projection.load_state_dict(tensors, strict=True, assign=True)
    if faceid_v2 is None:
        faceid_v2 = kind == FACEID_PLUS and any(word in name.lower() for word in FACEID_V2_NAMES)
    return IPAdapter(projection, key_values, name, faceid_v2=faceid_v2)


def load_ip_adapter(
    path: str | Path, device: Device | str | None = None, dtype: DType | None = None
) -> IPAdapter:
    """An IP-Adapter file (`.bin` / `.safetensors`, tencent-ailab or diffusers layout), named after the file."""
    path = Path(path)
    state_dict = read_state_dict(path, what="IP-Adapter")
    try:
        return ip_adapter_from_state_dict(state_dict, path.stem, device=device, dtype=dtype)
    except ValueError as error:
        raise ModelFileError(
            path, "IP-Adapter", str(error), "an IP-Adapter base, plus, FaceID or FaceID Plus file"
        ) from error
