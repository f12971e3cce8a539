"""Key maps between ControlNet files and our `ControlNet`, and the architecture read from a file's keys.

Two layouts users have:
- lllyasviel (ControlNet 1.0/1.1 single files, with or without a `control_model.` prefix): `time_embed.*`,
  `input_blocks.*`, `middle_block.*` as in the LDM UNet, `input_hint_block.{0,2,4,...}` (the hint encoder's
  convolutions, SiLU between), `zero_convs.N.0`, `middle_block_out.0`, SDXL `label_emb.0.*`;
- diffusers `ControlNetModel`: `conv_in`, `time_embedding.*`, `down_blocks.*`, `mid_block.*`,
  `controlnet_cond_embedding.{conv_in,blocks.N,conv_out}`, `controlnet_down_blocks.N`,
  `controlnet_mid_block`, SDXL `add_embedding.*`.

The maps are built from a (meta) model like the UNet's: `{their key: our key}` for every tensor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from ...fluxion import layers as fl
from . import diffusers as diffusers_format
from . import ldm as ldm_format
from .ldm import count_matches, expand_module_map, find_block, is_block

LLLYASVIEL_PREFIX = "control_model."
DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
)
CONTROLNET_EXPECTED = (
    "a ControlNet (lllyasviel keys input_hint_block.*, zero_convs.*, optionally under control_model., "
    "or diffusers keys controlnet_cond_embedding.*, controlnet_down_blocks.*)"
)


def controlnet_layout(keys: Sequence[str]) -> tuple[str, str] | None:
    """("lllyasviel" or "diffusers", key prefix) of a ControlNet file's keys, or None if it is not one."""
    if any(key.startswith("control_model.input_hint_block.") for key in keys):
        return "lllyasviel", "control_model."
    if "input_hint_block.0.weight" in keys:
        return "lllyasviel", ""
    if "controlnet_cond_embedding.conv_in.weight" in keys:
        return "diffusers", ""
    return None


def _hint_holder(controlnet: fl.Chain) -> str:
    """Our module path of the block holding the hint encoder (a union ControlNet's fuser included)."""
    first_name, first = next(iter(controlnet.DownBlocks.named_children()))
    holder = next(
        name
        for name, child in first.named_children()
        if is_block(child, "HintEmbedding", "UnionHintEmbedding")
    )
    return f"DownBlocks.{first_name}.{holder}"


def _hint_convolutions(controlnet: fl.Chain) -> list[str]:
    """Our module paths of the hint encoder's convolutions, in order."""
    encoder = find_block(controlnet, "ConditionEncoder")
    prefix = f"{_hint_holder(controlnet)}.ConditionEncoder"
    return [f"{prefix}.{name}" for name, child in encoder.named_children() if isinstance(child, fl.Conv2d)]


def _outputs(controlnet: fl.Chain) -> list[tuple[str, int | None]]:
    """(our conv path, skip index or None for the middle block's) of the output convolutions."""
    outputs = find_block(controlnet, "ControlOutputs")
    result: list[tuple[str, int | None]] = []
    for name, child in outputs.named_children():
        if is_block(child, "ZeroConvolution"):
            result.append((f"ControlOutputs.{name}.Conv2d", child.index))
        else:
            result.append((f"ControlOutputs.{name}", None))
    return result


def lllyasviel_controlnet_module_map(controlnet: fl.Chain) -> dict[str, str]:
    """Our module paths -> lllyasviel module paths (without the `control_model.` prefix)."""
    mapping = ldm_format.ldm_encoder_module_map(controlnet, controlnet.config.unet)
    for index, ours in enumerate(_hint_convolutions(controlnet)):
        mapping[ours] = f"input_hint_block.{2 * index}"
    for ours, skip in _outputs(controlnet):
        mapping[ours] = "middle_block_out.0" if skip is None else f"zero_convs.{skip}.0"
    return mapping


def diffusers_controlnet_module_map(controlnet: fl.Chain) -> dict[str, str]:
    """Our module paths -> diffusers `ControlNetModel` module paths."""
    mapping = diffusers_format.diffusers_encoder_module_map(controlnet, controlnet.config.unet)
    convolutions = _hint_convolutions(controlnet)
    mapping[convolutions[0]] = "controlnet_cond_embedding.conv_in"
    for index, ours in enumerate(convolutions[1:-1]):
        mapping[ours] = f"controlnet_cond_embedding.blocks.{index}"
    mapping[convolutions[-1]] = "controlnet_cond_embedding.conv_out"
    for ours, skip in _outputs(controlnet):
        mapping[ours] = "controlnet_mid_block" if skip is None else f"controlnet_down_blocks.{skip}"
    return mapping


def lllyasviel_controlnet_key_map(controlnet: fl.Chain) -> dict[str, str]:
    """`{lllyasviel key without prefix: our key}` for every tensor of `controlnet`."""
    return expand_module_map(controlnet, lllyasviel_controlnet_module_map(controlnet))


def diffusers_controlnet_key_map(controlnet: fl.Chain) -> dict[str, str]:
    """`{diffusers ControlNetModel key: our key}` for every tensor of `controlnet`."""
    return expand_module_map(controlnet, diffusers_controlnet_module_map(controlnet))


# -- architecture from keys and shapes ----------------------------------------------------------------------------


def hint_channels_from_shapes(
    shapes: Mapping[str, tuple[int, ...]], layout: str
) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, hint encoder widths) from the hint encoder's convolution shapes."""
    if layout == "lllyasviel":
        indices = sorted(
            {int(m.group(1)) for k in shapes if (m := re.match(r"input_hint_block\.(\d+)\.weight", k))}
        )
        convs = [shapes[f"input_hint_block.{i}.weight"] for i in indices]
    else:
        blocks = count_matches(shapes, r"controlnet_cond_embedding\.blocks\.(\d+)\.")
        convs = [
            shapes["controlnet_cond_embedding.conv_in.weight"],
            *(shapes[f"controlnet_cond_embedding.blocks.{i}.weight"] for i in range(blocks)),
            shapes["controlnet_cond_embedding.conv_out.weight"],
        ]
    widths = [convs[0][0]] + [conv[0] for conv in convs[2:-1:2]]
    return convs[0][1], tuple(widths)


def ldm_shapes_from_diffusers(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The LDM key shapes a diffusers-layout ControlNet's UNet part would have (enough to infer its config)."""
    keys = list(shapes)
    levels = count_matches(keys, r"down_blocks\.(\d+)\.")
    per_level = count_matches(keys, r"down_blocks\.0\.resnets\.(\d+)\.")
    result: dict[str, tuple[int, ...]] = {"input_blocks.0.0.weight": shapes["conv_in.weight"]}
    index = 1
    for level in range(levels):
        for layer in range(per_level):
            result[f"input_blocks.{index}.0.out_layers.3.weight"] = shapes[
                f"down_blocks.{level}.resnets.{layer}.conv2.weight"
            ]
            prefix = f"down_blocks.{level}.attentions.{layer}."
            for key, shape in shapes.items():
                if key.startswith(prefix):
                    result[f"input_blocks.{index}.1." + key[len(prefix) :]] = shape
            index += 1
        if f"down_blocks.{level}.downsamplers.0.conv.weight" in shapes:
            result[f"input_blocks.{index}.0.op.weight"] = shapes[
                f"down_blocks.{level}.downsamplers.0.conv.weight"
            ]
            index += 1
    for key, shape in shapes.items():
        if key.startswith("mid_block.attentions.0."):
            result["middle_block.1." + key[len("mid_block.attentions.0.") :]] = shape
    if "add_embedding.linear_1.weight" in shapes:
        result["label_emb.0.0.weight"] = shapes["add_embedding.linear_1.weight"]
    return result


# -- ControlNet Union / ProMax (xinsir's controlnet-union-sdxl-1.0, diffusers' ControlNetUnionModel) -------------

UNION_WEIGHT_NAMES = ("diffusion_pytorch_model_promax.safetensors",)
"""The ProMax file of the public release, beside the plain union file `diffusion_pytorch_model.safetensors`."""
UNION_SLICE = ":"
"""`their key:i` in a union key map: the i-th third (query, key, value) of an `nn.MultiheadAttention`'s
`in_proj_weight` / `in_proj_bias`, which our attention keeps as three linear layers."""


def is_union_controlnet(keys: Sequence[str]) -> bool:
    """Whether a diffusers-layout ControlNet file's keys are a union ControlNet's (control types, fuser)."""
    return "control_add_embedding.linear_1.weight" in keys and "task_embedding" in keys


def union_sizes_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """(control types, control-type embedding width, transformer layers) of a union ControlNet file."""
    types = shapes["task_embedding"][0]
    embedding_dim = shapes["control_add_embedding.linear_1.weight"][1] // types
    layers = count_matches(shapes, r"transformer_layes\.(\d+)\.")
    return types, embedding_dim, layers


def diffusers_union_module_map(controlnet: fl.Chain) -> dict[str, str]:
    """Our module paths -> diffusers `ControlNetUnionModel` module paths (in-projections as `attn.in_proj`)."""
    mapping = diffusers_controlnet_module_map(controlnet)
    embedding = "TimestepEncoder.ControlTypeEmbedding.RangeEncoder"
    mapping[f"{embedding}.Linear_1"] = "control_add_embedding.linear_1"
    mapping[f"{embedding}.Linear_2"] = "control_add_embedding.linear_2"
    holder = _hint_holder(controlnet)
    mapping[f"{holder}.Parameter"] = "task_embedding"
    mapping[f"{holder}.Linear"] = "spatial_ch_projs"
    transformer = find_block(controlnet, "UnionHintEmbedding").Chain
    for index, (name, _) in enumerate(transformer.named_children()):
        ours, theirs = f"{holder}.Chain.{name}", f"transformer_layes.{index}"
        mapping[f"{ours}.Residual_1.LayerNorm"] = f"{theirs}.ln_1"
        for part, projection in enumerate(("Linear_1", "Linear_2", "Linear_3")):
            mapping[f"{ours}.Residual_1.SelfAttention.Distribute.{projection}"] = (
                f"{theirs}.attn.in_proj{part}"
            )
        mapping[f"{ours}.Residual_1.SelfAttention.Linear"] = f"{theirs}.attn.out_proj"
        mapping[f"{ours}.Residual_2.LayerNorm"] = f"{theirs}.ln_2"
        mapping[f"{ours}.Residual_2.Linear_1"] = f"{theirs}.mlp.c_fc"
        mapping[f"{ours}.Residual_2.Linear_2"] = f"{theirs}.mlp.c_proj"
    return mapping


def diffusers_union_key_map(controlnet: fl.Chain) -> dict[str, str]:
    """`{diffusers ControlNetUnionModel key: our key}`; an in-projection third is `in_proj_weight:i` (`UNION_SLICE`)."""
    keys: dict[str, str] = {}
    for theirs, ours in expand_module_map(controlnet, diffusers_union_module_map(controlnet)).items():
        if match := re.fullmatch(r"(.*\.attn)\.in_proj(\d)\.(weight|bias)", theirs):
            theirs = f"{match.group(1)}.in_proj_{match.group(3)}{UNION_SLICE}{match.group(2)}"
        elif theirs == "task_embedding.weight":
            theirs = "task_embedding"
        keys[theirs] = ours
    return keys


def union_source_key(key: str) -> tuple[str, int | None]:
    """(file key, third or None) of a union key map key."""
    name, _, part = key.partition(UNION_SLICE)
    return name, int(part) if part else None


# -- Stability's Control-LoRA files -------------------------------------------------------------------------------

CONTROL_LORA_MARKER = "lora_controlnet"
"""The key Stability's Control-LoRA files hold (ComfyUI's `load_controlnet_state_dict` detects them by it)."""
CONTROL_LORA_SUFFIXES = (".weight", ".bias", ".up", ".down")
CONTROL_LORA_EXPECTED = (
    "a Control-LoRA (Stability's control-lora files: key lora_controlnet, lllyasviel-named input_hint_block.*, "
    "zero_convs.*, middle_block_out.*, and full weights or .up/.down low-rank pairs for the UNet's layers)"
)


def is_control_lora(keys: Sequence[str]) -> bool:
    """Whether a file's keys are a Control-LoRA's (the `lora_controlnet` marker)."""
    return CONTROL_LORA_MARKER in keys


def control_lora_entries(keys: Sequence[str]) -> dict[str, str]:
    """`{file key: kind}` of the tensors ComfyUI's `ControlLora` applies (kind: weight, bias, up or down).

    As ComfyUI: the marker and keys holding "__" or another suffix are not applied."""
    entries: dict[str, str] = {}
    for key in keys:
        if key == CONTROL_LORA_MARKER or "__" in key:
            continue
        for suffix in CONTROL_LORA_SUFFIXES:
            if key.endswith(suffix):
                entries[key] = suffix[1:]
    return entries


def control_lora_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The lllyasviel key shapes of a Control-LoRA's ControlNet: full tensors as stored, and for each low-rank
    pair `M.up` (out, rank[, 1, 1]) / `M.down` (rank, in[, k, k]) the weight `M.weight` (out, in[, k, k])."""
    result: dict[str, tuple[int, ...]] = {}
    for key, kind in control_lora_entries(list(shapes)).items():
        module = key.rpartition(".")[0]
        if kind in ("weight", "bias"):
            result[key] = tuple(shapes[key])
        elif kind == "up" and f"{module}.down" in shapes:
            result[f"{module}.weight"] = (shapes[key][0], *shapes[f"{module}.down"][1:])
    return result
