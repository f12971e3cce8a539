"""IP-Adapter file layouts, normalized to the tencent-ailab layout, and that layout mapped onto our modules.

Layouts read:
- "tencent": tencent-ailab/IP-Adapter files (`ip-adapter_sd15.bin`, `.safetensors`): `image_proj.*` and
  `ip_adapter.{N}.to_k_ip.weight` / `.to_v_ip.weight`, where N = 2 i + 1 for the i-th cross-attention block
  in diffusers' processor order (down blocks, then up blocks, then the middle block); the `.bin` nests the
  two groups as dicts, which the file reader flattens to the same dotted names. This is what diffusers'
  `load_ip_adapter` consumes.
- "diffusers": a diffusers UNet state dict after `load_ip_adapter`: `encoder_hid_proj.image_projection_layers.0.*`
  (`ImageProjection` / `IPAdapterPlusImageProjection` names) and
  `<block>.attn2.processor.to_k_ip.0.weight` (optionally under `unet.`).

Image projections: "base" (`proj` Linear to N tokens, `norm` LayerNorm) and "plus" (perceiver resampler:
`latents`, `proj_in`, `proj_out`, `norm_out`, `layers.L.0.{norm1,norm2,to_q,to_kv,to_out}`,
`layers.L.1.{0,1,3}` LayerNorm/Linear/Linear feed-forward); FaceID (`ip-adapter-faceid_sd15.bin`,
`_sdxl`): "faceid" (`proj.0` Linear, GELU, `proj.2` Linear to N tokens, `norm` LayerNorm, on a 512-d
insightface embedding) and "faceid_plus" (Plus / Plus v2: the same `proj.0/proj.2/norm` give the latents of
`perceiver_resampler.{proj_in,proj_out,norm_out,layers.*}`, which reads the face crop's CLIP penultimate hidden
states). FaceID files also hold LoRA weights in `ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight`: they are
not read here (the release ships the same LoRA as a kohya file, `*_lora.safetensors`, for the LoRA loader).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..model_files import ModelFileError, read_metadata, read_state_dict

BASE, PLUS, FACEID, FACEID_PLUS = "base", "plus", "faceid", "faceid_plus"
TENCENT, DIFFUSERS = "tencent", "diffusers"
DIFFUSERS_PROJECTION_PREFIX = "encoder_hid_proj.image_projection_layers.0."
_DIFFUSERS_KV = re.compile(r"^(?P<block>.+)\.attn2\.processor\.to_(?P<kv>[kv])_ip\.0\.weight$")
_TENCENT_KV = re.compile(r"^ip_adapter\.(?P<index>\d+)\.to_(?P<kv>[kv])_ip\.weight$")
_SECTIONS = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}  # diffusers' `attn_processors` order

# tencent "plus" key (within `image_proj.`) -> diffusers `IPAdapterPlusImageProjection` key, per layer L
PLUS_LAYER_KEYS_TO_DIFFUSERS: dict[str, str] = {
    "layers.{L}.0.norm1.weight": "layers.{L}.ln0.weight",
    "layers.{L}.0.norm1.bias": "layers.{L}.ln0.bias",
    "layers.{L}.0.norm2.weight": "layers.{L}.ln1.weight",
    "layers.{L}.0.norm2.bias": "layers.{L}.ln1.bias",
    "layers.{L}.0.to_q.weight": "layers.{L}.attn.to_q.weight",
    "layers.{L}.0.to_out.weight": "layers.{L}.attn.to_out.0.weight",
    "layers.{L}.1.0.weight": "layers.{L}.ff.0.weight",
    "layers.{L}.1.0.bias": "layers.{L}.ff.0.bias",
    "layers.{L}.1.1.weight": "layers.{L}.ff.1.net.0.proj.weight",
    "layers.{L}.1.3.weight": "layers.{L}.ff.1.net.2.weight",
}
"""`to_kv` is diffusers' `attn.to_k` and `attn.to_v` stacked along the output features."""
PLUS_SHARED_KEYS = ("latents", "proj_in.weight", "proj_in.bias", "proj_out.weight", "proj_out.bias")
PLUS_SHARED_KEYS += ("norm_out.weight", "norm_out.bias")
BASE_KEYS_TO_DIFFUSERS = {
    "proj.weight": "image_embeds.weight",
    "proj.bias": "image_embeds.bias",
    "norm.weight": "norm.weight",
    "norm.bias": "norm.bias",
}

# tencent key (within `image_proj.`) -> our module's state-dict key
BASE_KEYS_TO_OURS = {
    "proj.weight": "Linear.weight",
    "proj.bias": "Linear.bias",
    "norm.weight": "LayerNorm.weight",
    "norm.bias": "LayerNorm.bias",
}
PLUS_SHARED_KEYS_TO_OURS = {
    "latents": "Parameter.weight",  # (1, Q, D) in the file, (Q, D) in ours
    "proj_in.weight": "Linear_1.weight",
    "proj_in.bias": "Linear_1.bias",
    "proj_out.weight": "Linear_2.weight",
    "proj_out.bias": "Linear_2.bias",
    "norm_out.weight": "LayerNorm.weight",
    "norm_out.bias": "LayerNorm.bias",
}
_OURS_LAYER = "PerceiverLayer_{n}"  # our layers are numbered from 1

# FaceID (`MLPProjModel` of ip_adapter_faceid): Linear (proj.0), GELU, Linear (proj.2), LayerNorm (norm).
FACEID_KEYS_TO_OURS = {
    "proj.0.weight": "Linear_1.weight",
    "proj.0.bias": "Linear_1.bias",
    "proj.2.weight": "Linear_2.weight",
    "proj.2.bias": "Linear_2.bias",
    "norm.weight": "LayerNorm.weight",
    "norm.bias": "LayerNorm.bias",
}
# FaceID Plus (`ProjModelFaceIdPlus`): the FaceID projection of the face embedding gives the perceiver's
# latents; `perceiver_resampler.*` (no learned latents) reads the face crop's CLIP hidden states.
FACEID_PLUS_ID_PREFIX = "Distribute.Chain_1.FaceIDProjection."
FACEID_PLUS_SHARED_KEYS_TO_OURS = {
    "perceiver_resampler.proj_in.weight": "Distribute.Chain_2.Linear.weight",
    "perceiver_resampler.proj_in.bias": "Distribute.Chain_2.Linear.bias",
    "perceiver_resampler.proj_out.weight": "Linear.weight",
    "perceiver_resampler.proj_out.bias": "Linear.bias",
    "perceiver_resampler.norm_out.weight": "LayerNorm.weight",
    "perceiver_resampler.norm_out.bias": "LayerNorm.bias",
}
PLUS_LAYER_KEYS_TO_OURS: dict[str, str] = {
    "layers.{L}.0.norm1.weight": "{layer}.Residual.PerceiverAttention.Parallel.Chain.LayerNorm.weight",
    "layers.{L}.0.norm1.bias": "{layer}.Residual.PerceiverAttention.Parallel.Chain.LayerNorm.bias",
    "layers.{L}.0.norm2.weight": "{layer}.Residual.PerceiverAttention.Parallel.LayerNorm.weight",
    "layers.{L}.0.norm2.bias": "{layer}.Residual.PerceiverAttention.Parallel.LayerNorm.bias",
    "layers.{L}.0.to_q.weight": "{layer}.Residual.PerceiverAttention.Distribute.Linear_1.weight",
    "layers.{L}.0.to_kv.weight": "{layer}.Residual.PerceiverAttention.Distribute.Linear_2.weight",
    "layers.{L}.0.to_out.weight": "{layer}.Residual.PerceiverAttention.Linear.weight",
    "layers.{L}.1.0.weight": "{layer}.PerceiverFeedForward.LayerNorm.weight",
    "layers.{L}.1.0.bias": "{layer}.PerceiverFeedForward.LayerNorm.bias",
    "layers.{L}.1.1.weight": "{layer}.PerceiverFeedForward.Linear_1.weight",
    "layers.{L}.1.3.weight": "{layer}.PerceiverFeedForward.Linear_2.weight",
}


def detect_ip_adapter_layout(keys: list[str]) -> str | None:
    """ "tencent" or "diffusers" from the key names, None when neither fits."""
    if any(key.startswith("ip_adapter.") for key in keys) and any(
        key.startswith("image_proj.") for key in keys
    ):
        return TENCENT
    stripped = [key.removeprefix("unet.") for key in keys]
    if any(key.startswith(DIFFUSERS_PROJECTION_PREFIX) for key in stripped) and any(
        _DIFFUSERS_KV.match(key) for key in stripped
    ):
        return DIFFUSERS
    return None


def projection_kind(image_proj: Mapping[str, Tensor]) -> str:
    """ "base", "plus", "faceid" or "faceid_plus" from the tencent `image_proj.*` keys (without the prefix)."""
    if "proj.weight" in image_proj and "norm.weight" in image_proj:
        return BASE
    if "latents" in image_proj and "proj_in.weight" in image_proj:
        return PLUS
    if "perceiver_resampler.proj_in.weight" in image_proj and "proj.0.weight" in image_proj:
        return FACEID_PLUS
    if "proj.0.weight" in image_proj and "proj.2.weight" in image_proj and "norm.weight" in image_proj:
        return FACEID
    found = ", ".join(sorted(image_proj)[:6]) or "nothing"
    full_face = " (this looks like IP-Adapter full-face: proj.3)" if "proj.3.weight" in image_proj else ""
    raise ValueError(
        f"an image projection that is neither IP-Adapter base (proj, norm), plus (latents, proj_in, layers.*), "
        f"FaceID (proj.0, proj.2, norm) nor FaceID Plus (proj.0, norm, perceiver_resampler.*): found {found}"
        f"{full_face}; full-face and other variants are not supported"
    )


def plus_depth(image_proj: Mapping[str, Tensor]) -> int:
    """Number of perceiver layers in a tencent "plus" projection."""
    indices = {int(key.split(".")[1]) for key in image_proj if key.startswith("layers.")}
    return max(indices) + 1 if indices else 0


def _diffusers_block_order(block: str) -> tuple[int, ...]:
    section, _, rest = block.partition(".")
    if section not in _SECTIONS:
        raise ValueError(f"unexpected diffusers attention block {block!r}")
    return (_SECTIONS[section], *(int(part) for part in rest.split(".") if part.isdigit()))


def diffusers_to_tencent(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A diffusers UNet's IP-Adapter weights (after `load_ip_adapter`) in the tencent layout."""
    state = {key.removeprefix("unet."): value for key, value in state_dict.items()}
    projection = {
        key.removeprefix(DIFFUSERS_PROJECTION_PREFIX): value
        for key, value in state.items()
        if key.startswith(DIFFUSERS_PROJECTION_PREFIX)
    }
    out: dict[str, Tensor] = {}
    if "image_embeds.weight" in projection:
        for tencent, theirs in BASE_KEYS_TO_DIFFUSERS.items():
            out[f"image_proj.{tencent}"] = projection[theirs]
    elif "latents" in projection:
        depth = 1 + max(int(key.split(".")[1]) for key in projection if key.startswith("layers."))
        for key in PLUS_SHARED_KEYS:
            out[f"image_proj.{key}"] = projection[key]
        for layer in range(depth):
            for tencent, theirs in PLUS_LAYER_KEYS_TO_DIFFUSERS.items():
                out["image_proj." + tencent.format(L=layer)] = projection[theirs.format(L=layer)]
            k, v = (projection[f"layers.{layer}.attn.to_{x}.weight"] for x in "kv")
            out[f"image_proj.layers.{layer}.0.to_kv.weight"] = torch.cat([k, v])
    else:
        raise ValueError(f"unsupported diffusers image projection (keys {sorted(projection)[:6]})")
    blocks: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _DIFFUSERS_KV.match(key)
        if match:
            blocks.setdefault(match["block"], {})[match["kv"]] = value
    for index, block in enumerate(sorted(blocks, key=_diffusers_block_order)):
        for kv in "kv":
            out[f"ip_adapter.{2 * index + 1}.to_{kv}_ip.weight"] = blocks[block][kv]
    return out


def tencent_key_value_weights(state_dict: Mapping[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """The (to_k_ip, to_v_ip) weights of every cross-attention block, in file order (N = 1, 3, 5, ...)."""
    pairs: dict[int, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        match = _TENCENT_KV.match(key)
        if match:
            pairs.setdefault(int(match["index"]), {})[match["kv"]] = value
    indices = sorted(pairs)
    expected = [2 * i + 1 for i in range(len(indices))]
    if indices != expected:
        raise ValueError(
            f"ip_adapter.N indices {indices[:8]}{' ...' if len(indices) > 8 else ''} are not 1, 3, 5, ... "
            "(one pair per cross-attention block)"
        )
    for index in indices:
        if set(pairs[index]) != {"k", "v"}:
            raise ValueError(f"ip_adapter.{index} lacks its to_k_ip or to_v_ip weight")
    return [(pairs[index]["k"], pairs[index]["v"]) for index in indices]


def tencent_projection_to_ours(image_proj: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tencent `image_proj.*` tensors (prefix removed) under our projection's state-dict keys."""
    kind = projection_kind(image_proj)
    if kind == BASE:
        return {ours: image_proj[tencent] for tencent, ours in BASE_KEYS_TO_OURS.items()}
    if kind == FACEID:
        return {ours: image_proj[tencent] for tencent, ours in FACEID_KEYS_TO_OURS.items()}
    if kind == FACEID_PLUS:
        out = {
            FACEID_PLUS_ID_PREFIX + ours: image_proj[tencent] for tencent, ours in FACEID_KEYS_TO_OURS.items()
        }
        out |= {ours: image_proj[tencent] for tencent, ours in FACEID_PLUS_SHARED_KEYS_TO_OURS.items()}
        resampler = {
            key.removeprefix("perceiver_resampler."): value
            for key, value in image_proj.items()
            if key.startswith("perceiver_resampler.")
        }
        depth = plus_depth(resampler)
        for layer in range(depth):
            name = _OURS_LAYER.format(n=layer + 1) if depth > 1 else "PerceiverLayer"
            for tencent, ours in PLUS_LAYER_KEYS_TO_OURS.items():
                out[ours.format(layer=name)] = resampler[tencent.format(L=layer)]
        return out
    out = {ours: image_proj[tencent] for tencent, ours in PLUS_SHARED_KEYS_TO_OURS.items()}
    out["Parameter.weight"] = out["Parameter.weight"].reshape(out["Parameter.weight"].shape[-2:])
    depth = plus_depth(image_proj)
    for layer in range(depth):
        name = _OURS_LAYER.format(n=layer + 1) if depth > 1 else "PerceiverLayer"
        for tencent, ours in PLUS_LAYER_KEYS_TO_OURS.items():
            out[ours.format(layer=name)] = image_proj[tencent.format(L=layer)]
    return out


# -- saved image embeddings (ours: a safetensors file with tensors "positive", "negative") --------------------

EMBEDDINGS_FORMAT = "fluxion.ip_adapter_image_embeddings"
EMBEDDINGS_WHAT = "IP-Adapter image embeddings"


def write_image_embeddings(path: str | Path, positive: Tensor, negative: Tensor, kind: str) -> None:
    """Write reference-image embeddings: tensors "positive", "negative"; metadata format and kind."""
    save_file(
        {"positive": positive.contiguous().cpu(), "negative": negative.contiguous().cpu()},
        str(path),
        metadata={"format": EMBEDDINGS_FORMAT, "kind": kind},
    )


def read_image_embeddings(path: str | Path) -> tuple[Tensor, Tensor, str]:
    """(positive, negative, kind) from a file written by `write_image_embeddings`."""
    metadata = read_metadata(path, what=EMBEDDINGS_WHAT)
    if metadata.get("format") != EMBEDDINGS_FORMAT:
        raise ModelFileError(
            path,
            EMBEDDINGS_WHAT,
            f"its metadata format is {metadata.get('format')!r}",
            f"{EMBEDDINGS_FORMAT!r} (written by ImageEmbeddings.save)",
        )
    tensors = read_state_dict(path, what=EMBEDDINGS_WHAT, keys=["positive", "negative"])
    return tensors["positive"], tensors["negative"], metadata.get("kind", "")


# -- face embeddings (insightface's 512-d identity embedding, computed elsewhere) ------------------------------

FACE_EMBEDDINGS_WHAT = "face embeddings"
FACE_EMBEDDING_KEYS = ("face_embeds", "id_embeds", "embeds", "embedding")
FACE_EMBEDDING_SUFFIXES = (".npy", ".safetensors", ".pt", ".pth", ".bin")


def _as_face_matrix(path: str | Path, tensor: Tensor) -> Tensor:
    if tensor.dim() == 3 and tensor.shape[1] == 1:  # diffusers' (N, 1, D) image-embeds layout
        tensor = tensor[:, 0]
    if tensor.dim() == 1:
        tensor = tensor[None]
    if tensor.dim() != 2 or not tensor.is_floating_point():
        raise ModelFileError(
            path,
            FACE_EMBEDDINGS_WHAT,
            f"a {tensor.dtype} tensor of shape {tuple(tensor.shape)}",
            "float face embeddings of shape (D,), (N, D) or (N, 1, D) (insightface: D = 512)",
        )
    return tensor.float()


def read_face_embeddings(path: str | Path) -> Tensor:
    """(N, D) face embeddings from `.npy`, `.safetensors` or `.pt`: one tensor, or under one of
    `FACE_EMBEDDING_KEYS` (IP-Adapter image embeds saved by `ImageEmbeddings.save` are refused)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(path, FACE_EMBEDDINGS_WHAT, "no such file", "a .npy, .safetensors or .pt file")
    suffix = path.suffix.lower()
    if suffix not in FACE_EMBEDDING_SUFFIXES:
        raise ModelFileError(
            path,
            FACE_EMBEDDINGS_WHAT,
            f"a {suffix or 'suffix-less'} file",
            "a .npy, .safetensors or .pt file",
        )
    if suffix == ".npy":
        import numpy as np

        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as error:
            raise ModelFileError(
                path, FACE_EMBEDDINGS_WHAT, f"not a plain .npy array ({error})", "a float array"
            ) from error
        return _as_face_matrix(path, torch.from_numpy(np.asarray(array, dtype=np.float32)))
    if suffix in (".pt", ".pth", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unpickling failure is a bad file
            raise ModelFileError(
                path, FACE_EMBEDDINGS_WHAT, f"unreadable ({error})", "a torch tensor"
            ) from error
        if isinstance(loaded, Tensor):
            return _as_face_matrix(path, loaded)
        tensors = {key: value for key, value in dict(loaded).items() if isinstance(value, Tensor)}
    else:
        metadata = read_metadata(path, what=FACE_EMBEDDINGS_WHAT)
        if metadata.get("format") == EMBEDDINGS_FORMAT:
            raise ModelFileError(
                path,
                FACE_EMBEDDINGS_WHAT,
                f"IP-Adapter image embeds ({metadata.get('kind', '?')}, written by Fluxion Save IP-Adapter "
                "Embeds) for a base or plus IP-Adapter",
                "insightface face embeddings (D = 512) for IP-Adapter FaceID",
            )
        tensors = read_state_dict(path, what=FACE_EMBEDDINGS_WHAT)
    for key in FACE_EMBEDDING_KEYS:
        if key in tensors:
            return _as_face_matrix(path, tensors[key])
    if len(tensors) == 1:
        return _as_face_matrix(path, next(iter(tensors.values())))
    raise ModelFileError(
        path,
        FACE_EMBEDDINGS_WHAT,
        f"tensors {sorted(tensors)[:6]}",
        f"one tensor, or one named {', '.join(FACE_EMBEDDING_KEYS)}",
    )
