"""Key maps from the CLIP checkpoint layouts users have to fluxion's `CLIPTextEncoder` / `CLIPImageEncoder`.

Layouts (reference key -> our key, `{i}` the reference's 0-based layer index, `{layer}` our layer's name):
- transformers 4.x `CLIPTextModel(WithProjection)`: `text_model.*`, `text_projection.weight`; transformers
  5.x drops the `text_model.` prefix. `CLIPVisionModelWithProjection`: `vision_model.*`,
  `visual_projection.weight` (5.x: no `vision_model.` prefix).
- Original single files: SD1.5 `cond_stage_model.transformer.text_model.*`, SDXL CLIP-L
  `conditioner.embedders.0.transformer.text_model.*` (transformers names under a prefix).
- open_clip (SDXL's bigG `conditioner.embedders.1.model.*`, open_clip files): fused `attn.in_proj_weight`
  (q, k, v stacked on dim 0), `positional_embedding`, `ln_final`, `text_projection` / `visual.proj`
  stored (in, out), i.e. used as `x @ projection`: transposed for our Linear (out, in).
- diffusers folders: `text_encoder/`, `text_encoder_2/`, `image_encoder/` holding `model.safetensors`
  (maybe sharded, with `model.safetensors.index.json`) or `pytorch_model.bin`, plus `config.json`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

OurKeys = str | tuple[str, ...]  # a tuple: the reference tensor splits in equal parts along dim 0

TRANSFORMERS_LAYER_KEYS: dict[str, OurKeys] = {
    "layer_norm1.weight": "{layer}.Residual_1.LayerNorm.weight",
    "layer_norm1.bias": "{layer}.Residual_1.LayerNorm.bias",
    "self_attn.q_proj.weight": "{layer}.Residual_1.SelfAttention.Distribute.Linear_1.weight",
    "self_attn.q_proj.bias": "{layer}.Residual_1.SelfAttention.Distribute.Linear_1.bias",
    "self_attn.k_proj.weight": "{layer}.Residual_1.SelfAttention.Distribute.Linear_2.weight",
    "self_attn.k_proj.bias": "{layer}.Residual_1.SelfAttention.Distribute.Linear_2.bias",
    "self_attn.v_proj.weight": "{layer}.Residual_1.SelfAttention.Distribute.Linear_3.weight",
    "self_attn.v_proj.bias": "{layer}.Residual_1.SelfAttention.Distribute.Linear_3.bias",
    "self_attn.out_proj.weight": "{layer}.Residual_1.SelfAttention.Linear.weight",
    "self_attn.out_proj.bias": "{layer}.Residual_1.SelfAttention.Linear.bias",
    "layer_norm2.weight": "{layer}.Residual_2.LayerNorm.weight",
    "layer_norm2.bias": "{layer}.Residual_2.LayerNorm.bias",
    "mlp.fc1.weight": "{layer}.Residual_2.FeedForward.Linear_1.weight",
    "mlp.fc1.bias": "{layer}.Residual_2.FeedForward.Linear_1.bias",
    "mlp.fc2.weight": "{layer}.Residual_2.FeedForward.Linear_2.weight",
    "mlp.fc2.bias": "{layer}.Residual_2.FeedForward.Linear_2.bias",
}

OPEN_CLIP_LAYER_KEYS: dict[str, OurKeys] = {
    "ln_1.weight": "{layer}.Residual_1.LayerNorm.weight",
    "ln_1.bias": "{layer}.Residual_1.LayerNorm.bias",
    "attn.in_proj_weight": tuple(
        f"{{layer}}.Residual_1.SelfAttention.Distribute.Linear_{n}.weight" for n in (1, 2, 3)
    ),
    "attn.in_proj_bias": tuple(
        f"{{layer}}.Residual_1.SelfAttention.Distribute.Linear_{n}.bias" for n in (1, 2, 3)
    ),
    "attn.out_proj.weight": "{layer}.Residual_1.SelfAttention.Linear.weight",
    "attn.out_proj.bias": "{layer}.Residual_1.SelfAttention.Linear.bias",
    "ln_2.weight": "{layer}.Residual_2.LayerNorm.weight",
    "ln_2.bias": "{layer}.Residual_2.LayerNorm.bias",
    "mlp.c_fc.weight": "{layer}.Residual_2.FeedForward.Linear_1.weight",
    "mlp.c_fc.bias": "{layer}.Residual_2.FeedForward.Linear_1.bias",
    "mlp.c_proj.weight": "{layer}.Residual_2.FeedForward.Linear_2.weight",
    "mlp.c_proj.bias": "{layer}.Residual_2.FeedForward.Linear_2.bias",
}

TEXT_TOKEN_EMBEDDING = "TextEmbedding.TokenEncoder.ExtendableEmbedding.weight"
TEXT_POSITION_EMBEDDING = "TextEmbedding.PositionalEncoder.weight"
TEXT_PROJECTION = "TextProjection.PooledTextProjection.Linear.weight"
TEXT_FEEDFORWARD = "{layer}.Residual_2.FeedForward.Linear_1.weight"

TRANSFORMERS_TEXT_KEYS: dict[str, OurKeys] = {
    "embeddings.token_embedding.weight": TEXT_TOKEN_EMBEDDING,
    "embeddings.position_embedding.weight": TEXT_POSITION_EMBEDDING,
    "final_layer_norm.weight": "LayerNorm.weight",
    "final_layer_norm.bias": "LayerNorm.bias",
}

OPEN_CLIP_TEXT_KEYS: dict[str, OurKeys] = {
    "token_embedding.weight": TEXT_TOKEN_EMBEDDING,
    "positional_embedding": TEXT_POSITION_EMBEDDING,
    "ln_final.weight": "LayerNorm.weight",
    "ln_final.bias": "LayerNorm.bias",
}

IMAGE_CLASS_TOKEN = "ImageEmbedding.Concatenate.ClassToken.weight"
IMAGE_PATCH_EMBEDDING = "ImageEmbedding.Concatenate.PatchEncoder.Conv2d.weight"
IMAGE_POSITION_EMBEDDING = "ImageEmbedding.Residual.PositionalEncoder.weight"
IMAGE_PROJECTION = "ImageProjection.Linear.weight"

TRANSFORMERS_IMAGE_KEYS: dict[str, OurKeys] = {
    "embeddings.class_embedding": IMAGE_CLASS_TOKEN,
    "embeddings.patch_embedding.weight": IMAGE_PATCH_EMBEDDING,
    "embeddings.position_embedding.weight": IMAGE_POSITION_EMBEDDING,
    "pre_layrnorm.weight": "LayerNorm.weight",  # sic: transformers' spelling
    "pre_layrnorm.bias": "LayerNorm.bias",
    "post_layernorm.weight": "ImageProjection.LayerNorm.weight",
    "post_layernorm.bias": "ImageProjection.LayerNorm.bias",
}

OPEN_CLIP_IMAGE_KEYS: dict[str, OurKeys] = {
    "class_embedding": IMAGE_CLASS_TOKEN,
    "conv1.weight": IMAGE_PATCH_EMBEDDING,
    "positional_embedding": IMAGE_POSITION_EMBEDDING,
    "ln_pre.weight": "LayerNorm.weight",
    "ln_pre.bias": "LayerNorm.bias",
    "ln_post.weight": "ImageProjection.LayerNorm.weight",
    "ln_post.bias": "ImageProjection.LayerNorm.bias",
}

# Keys some files carry that hold nothing a forward pass needs, with the reason they are skipped.
IGNORED_KEYS: dict[str, str] = {
    "embeddings.position_ids": "transformers' buffer of 0..L-1 (older files save it; positions are implicit)",
    "logit_scale": "open_clip's contrastive temperature, unused by an encoder",
}


@dataclass(frozen=True)
class KeyLayout:
    """Where an encoder sits in a file and how its keys are named.

    `keys` are relative to `prefix + model_prefix`, layer keys to `... + layers_prefix + "{i}."`;
    `projection` (relative to `prefix`) is optional; `transposed` names reference keys stored (in, out).
    """

    name: str
    description: str
    prefix: str
    model_prefix: str
    keys: dict[str, OurKeys]
    layers_prefix: str
    layer_keys: dict[str, OurKeys]
    projection: str
    projection_key: str
    transposed: frozenset[str] = field(default_factory=frozenset)

    @property
    def root(self) -> str:
        """Prefix of the model's own keys (embeddings, layers, norms)."""
        return self.prefix + self.model_prefix

    @property
    def signature(self) -> str:
        """A key every file of this layout has: the first of `keys`."""
        return self.root + next(iter(self.keys))

    def owns(self, key: str) -> bool:
        """Whether `key` belongs to this encoder in a file that may hold other models too."""
        return key.startswith(self.root) or key == self.prefix + self.projection

    def ignored(self, key: str) -> str | None:
        """Why `key` is skipped, or None when it must be mapped."""
        return IGNORED_KEYS.get(key[len(self.root) :]) if key.startswith(self.root) else None


def _transformers_text(name: str, description: str, prefix: str, model_prefix: str) -> KeyLayout:
    return KeyLayout(
        name,
        description,
        prefix,
        model_prefix,
        TRANSFORMERS_TEXT_KEYS,
        "encoder.layers.",
        TRANSFORMERS_LAYER_KEYS,
        "text_projection.weight",
        TEXT_PROJECTION,
    )


def _open_clip_text(name: str, description: str, prefix: str) -> KeyLayout:
    return KeyLayout(
        name,
        description,
        prefix,
        "",
        OPEN_CLIP_TEXT_KEYS,
        "transformer.resblocks.",
        OPEN_CLIP_LAYER_KEYS,
        "text_projection",
        TEXT_PROJECTION,
        transposed=frozenset({prefix + "text_projection"}),
    )


TEXT_LAYOUTS: dict[str, KeyLayout] = {
    layout.name: layout
    for layout in [
        _transformers_text(
            "transformers", "transformers 4.x CLIPTextModel (text_model.*)", "", "text_model."
        ),
        _transformers_text("transformers5", "transformers 5.x CLIPTextModel (no text_model. prefix)", "", ""),
        _transformers_text(
            "sd15",
            "SD1.5 single file (cond_stage_model.transformer.text_model.*)",
            "cond_stage_model.transformer.",
            "text_model.",
        ),
        _transformers_text(
            "sdxl_clip_l",
            "SDXL single file, CLIP-L (conditioner.embedders.0.transformer.text_model.*)",
            "conditioner.embedders.0.transformer.",
            "text_model.",
        ),
        _open_clip_text(
            "sdxl_clip_g",
            "SDXL single file, OpenCLIP bigG (conditioner.embedders.1.model.*)",
            "conditioner.embedders.1.model.",
        ),
        _open_clip_text("open_clip", "open_clip text tower (token_embedding, transformer.resblocks.*)", ""),
    ]
}


def _transformers_image(name: str, description: str, model_prefix: str) -> KeyLayout:
    return KeyLayout(
        name,
        description,
        "",
        model_prefix,
        TRANSFORMERS_IMAGE_KEYS,
        "encoder.layers.",
        TRANSFORMERS_LAYER_KEYS,
        "visual_projection.weight",
        IMAGE_PROJECTION,
    )


IMAGE_LAYOUTS: dict[str, KeyLayout] = {
    layout.name: layout
    for layout in [
        _transformers_image(
            "transformers", "transformers CLIPVisionModelWithProjection (vision_model.*)", "vision_model."
        ),
        _transformers_image("transformers5", "transformers 5.x vision model (no vision_model. prefix)", ""),
        KeyLayout(
            "open_clip",
            "open_clip image tower (visual.*)",
            "",
            "visual.",
            OPEN_CLIP_IMAGE_KEYS,
            "transformer.resblocks.",
            OPEN_CLIP_LAYER_KEYS,
            "visual.proj",
            IMAGE_PROJECTION,
            transposed=frozenset({"visual.proj"}),
        ),
    ]
}


class CLIPKeyError(KeyError):
    """A state dict that does not fit the layout: says what was found and what was expected."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def detect_layout(state_dict: Mapping[str, Any], layouts: Mapping[str, KeyLayout], what: str) -> KeyLayout:
    """The one layout whose signature key the state dict has (an error names them all otherwise)."""
    found = [layout for layout in layouts.values() if layout.signature in state_dict]
    if len(found) == 1:
        return found[0]
    expected = "; ".join(f"{layout.name}: {layout.signature}" for layout in layouts.values())
    if not found:
        raise CLIPKeyError(
            f"no {what} found: the state dict has none of the expected keys ({expected}). "
            f"It holds {_preview(list(state_dict))}"
        )
    raise CLIPKeyError(
        f"several {what}s in this state dict ({', '.join(layout.name for layout in found)}): pass layout=..."
    )


def count_layers(state_dict: Mapping[str, Any], layout: KeyLayout) -> int:
    """Number of transformer layers, from the indices under the layout's layers prefix (checked contiguous)."""
    start = layout.root + layout.layers_prefix
    numbers = {key: key[len(start) :].split(".")[0] for key in state_dict if key.startswith(start)}
    for key, number in numbers.items():
        if not number.isdigit():
            raise CLIPKeyError(f"{layout.description}: {key!r} has no layer number after {start!r}")
    indices = {int(number) for number in numbers.values()}
    if not indices:
        raise CLIPKeyError(f"{layout.description}: no layer keys under {start!r}")
    if indices != set(range(len(indices))):
        raise CLIPKeyError(
            f"{layout.description}: layer indices {sorted(indices)} are not 0..{len(indices) - 1}"
        )
    return len(indices)


def convert_clip_state_dict(
    state_dict: Mapping[str, Tensor], layout: KeyLayout, layer_names: Sequence[str]
) -> dict[str, Tensor]:
    """The encoder's tensors renamed to our keys (fused q/k/v split, (in, out) projections transposed).

    Every key the layout owns must map (or be a documented ignored key); every expected key must exist.
    Keys the layout does not own (a checkpoint's UNet, VAE, other encoder) are left to other loaders.
    """
    expected: dict[str, OurKeys] = {layout.root + key: ours for key, ours in layout.keys.items()}
    for index, layer in enumerate(layer_names):
        base = f"{layout.root}{layout.layers_prefix}{index}."
        for key, ours in layout.layer_keys.items():
            expected[base + key] = (
                tuple(o.format(layer=layer) for o in ours)
                if isinstance(ours, tuple)
                else ours.format(layer=layer)
            )
    projection = layout.prefix + layout.projection
    if projection in state_dict:
        expected[projection] = layout.projection_key

    missing = [key for key in expected if key not in state_dict]
    unexpected = [
        key for key in state_dict if layout.owns(key) and key not in expected and layout.ignored(key) is None
    ]
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing {_preview(missing)}")
        if unexpected:
            problems.append(f"unexpected {_preview(unexpected)}")
        raise CLIPKeyError(
            f"{layout.description} with {len(layer_names)} layers: {'; '.join(problems)}. "
            f"Expected the {len(expected)} keys of that layout (e.g. {next(iter(expected))})"
        )

    converted: dict[str, Tensor] = {}
    for key, ours in expected.items():
        tensor = state_dict[key]
        if key in layout.transposed:
            tensor = tensor.t().contiguous()
        if isinstance(ours, tuple):
            if tensor.shape[0] % len(ours) != 0:
                raise CLIPKeyError(
                    f"{key} of shape {tuple(tensor.shape)} does not split in {len(ours)} along dim 0"
                )
            converted.update(zip(ours, tensor.chunk(len(ours), dim=0)))
        else:
            converted[ours] = tensor
    return converted


def read_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors of a `.safetensors` file, or of a `.bin/.pt/.ckpt` through `torch.load(weights_only=True)`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    content = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(content, dict) and "state_dict" in content and isinstance(content["state_dict"], dict):
        content = content["state_dict"]
    if not isinstance(content, dict) or not all(isinstance(v, Tensor) for v in content.values()):
        raise CLIPKeyError(f"{path}: expected a dict of tensors, got {type(content).__name__}")
    return dict(content)


WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_diffusers_component(folder: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """State dict and `config.json` of a transformers model saved in a folder (a diffusers component:
    `text_encoder/`, `text_encoder_2/`, `image_encoder/`), safetensors preferred, shards joined."""
    folder = Path(folder)
    config_path = folder / "config.json"
    config: dict[str, Any] = json.loads(config_path.read_text()) if config_path.is_file() else {}
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            state_dict: dict[str, Tensor] = {}
            for shard in shards:
                state_dict.update(read_state_dict_file(folder / shard))
            return state_dict, config
        return read_state_dict_file(path), config
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise FileNotFoundError(
        f"{folder}: no weights found (expected one of {', '.join(WEIGHT_FILES)}); it holds {present or 'nothing'}"
    )


def export_clip_state_dict(
    tensors: Mapping[str, Tensor], layout: KeyLayout, layer_names: Sequence[str]
) -> dict[str, Tensor]:
    """Our encoder's tensors under `layout`'s keys: the inverse of `convert_clip_state_dict`.

    Split q/k/v are fused back and (in, out) projections transposed back, so a file written with this
    loads with `convert_clip_state_dict` into the same tensors.
    """
    entries: dict[str, OurKeys] = {layout.root + key: ours for key, ours in layout.keys.items()}
    for index, layer in enumerate(layer_names):
        base = f"{layout.root}{layout.layers_prefix}{index}."
        for key, ours in layout.layer_keys.items():
            entries[base + key] = (
                tuple(o.format(layer=layer) for o in ours)
                if isinstance(ours, tuple)
                else ours.format(layer=layer)
            )
    if layout.projection_key in tensors:
        entries[layout.prefix + layout.projection] = layout.projection_key
    exported: dict[str, Tensor] = {}
    for key, ours in entries.items():
        tensor = torch.cat([tensors[o] for o in ours]) if isinstance(ours, tuple) else tensors[ours]
        exported[key] = tensor.t().contiguous() if key in layout.transposed else tensor
    return exported
