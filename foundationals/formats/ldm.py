"""Key maps between original single-file checkpoints (CompVis/Stability LDM layout) and our UNet and autoencoder.

A map is built from a model instance (the meta-device one the loader is about to fill), block by
block: a walk pairs each of our blocks with its LDM prefix, and a table per block type pairs their
children. `ldm_unet_key_map(unet)` and `ldm_autoencoder_key_map(autoencoder)` return
`{ldm key (without "model.diffusion_model." / "first_stage_model."): our state-dict key}`.
"""

from __future__ import annotations

from torch.nn import Module

from ...fluxion import layers as fl

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_AUTOENCODER_PREFIX = "first_stage_model."

# ours -> LDM, inside one block of each type
UNET_RESIDUAL_BLOCK = {
    "Chain.GroupNorm_1": "in_layers.0",
    "Chain.Conv2d_1": "in_layers.2",
    "Chain.RangeAdapter2d.Chain.Linear": "emb_layers.1",
    "Chain.GroupNorm_2": "out_layers.0",
    "Chain.Conv2d_2": "out_layers.3",
    "Conv2d": "skip_connection",
}
# The transformer block's inside is named alike in LDM and diffusers.
TRANSFORMER_BLOCK = {
    "SelfAttentionBlock.LayerNorm": "norm1",
    "SelfAttentionBlock.SelfAttention.Distribute.Linear_1": "attn1.to_q",
    "SelfAttentionBlock.SelfAttention.Distribute.Linear_2": "attn1.to_k",
    "SelfAttentionBlock.SelfAttention.Distribute.Linear_3": "attn1.to_v",
    "SelfAttentionBlock.SelfAttention.Linear": "attn1.to_out.0",
    "CrossAttentionBlock.LayerNorm": "norm2",
    "CrossAttentionBlock.Attention.Distribute.Linear_1": "attn2.to_q",
    "CrossAttentionBlock.Attention.Distribute.Linear_2": "attn2.to_k",
    "CrossAttentionBlock.Attention.Distribute.Linear_3": "attn2.to_v",
    "CrossAttentionBlock.Attention.Linear": "attn2.to_out.0",
    "FeedForward.LayerNorm": "norm3",
    "FeedForward.Linear_1": "ff.net.0.proj",
    "FeedForward.Linear_2": "ff.net.2",
}
AUTOENCODER_RESIDUAL_BLOCK = {
    "Chain.GroupNorm_1": "norm1",
    "Chain.Conv2d_1": "conv1",
    "Chain.GroupNorm_2": "norm2",
    "Chain.Conv2d_2": "conv2",
    "Conv2d": "nin_shortcut",
}
AUTOENCODER_ATTENTION = {
    "GroupNorm": "norm",
    "SelfAttention2d.Distribute.Linear_1": "q",
    "SelfAttention2d.Distribute.Linear_2": "k",
    "SelfAttention2d.Distribute.Linear_3": "v",
    "SelfAttention2d.Linear": "proj_out",
}


def spatial_transformer_table(block: fl.Chain) -> dict[str, str]:
    """Ours -> LDM/diffusers names inside one spatial transformer (same names in both layouts)."""
    projection = "Linear" if any(isinstance(child, fl.Linear) for child in block) else "Conv2d"
    table = {"GroupNorm": "norm", f"{projection}_1": "proj_in", f"{projection}_2": "proj_out"}
    names = [name for name, child in block.named_children() if is_block(child, "TransformerBlock")]
    for index, name in enumerate(names):
        table.update(
            {
                f"{name}.{ours}": f"transformer_blocks.{index}.{theirs}"
                for ours, theirs in TRANSFORMER_BLOCK.items()
            }
        )
    return table


def is_block(module: Module, *class_names: str) -> bool:
    """Whether `module` is one of our blocks of these class names.

    Our module paths are made of class names (`DownBlocks.Chain_2.ResidualBlock`), so the key maps recognise
    blocks by those names as well, and need not import the models they describe.
    """
    return type(module).__name__ in class_names


def find_block(model: Module, class_name: str) -> Module:
    """The first block of this class name in `model` (e.g. the autoencoder's `Encoder`)."""
    for module in model.modules():
        if is_block(module, class_name):
            return module
    raise ValueError(f"no {class_name} in {type(model).__name__}")


def add_block(mapping: dict[str, str], ours: str, theirs: str, table: dict[str, str], block: Module) -> None:
    """Record `ours.x -> theirs.y` for every `x -> y` of `table` that exists in `block`."""
    present = {name for name, _ in block.named_modules()}
    for our_name, their_name in table.items():
        if our_name in present:
            mapping[f"{ours}.{our_name}"] = f"{theirs}.{their_name}"


def expand_module_map(model: fl.Module, module_map: dict[str, str]) -> dict[str, str]:
    """Module-level map (ours -> theirs) to a key map `{their key: our key}` over every tensor of `model`."""
    keys: dict[str, str] = {}
    for our_key in model.state_dict():
        module, _, tensor = our_key.rpartition(".")
        if module not in module_map:
            raise KeyError(f"{type(model).__name__}: no external name for {our_key!r} (key map incomplete)")
        keys[f"{module_map[module]}.{tensor}"] = our_key
    return keys


def unet_block_children(block: fl.Chain) -> list[tuple[str, fl.Module]]:
    """The children that hold weights, in order (skip bookkeeping layers)."""
    return [
        (name, child)
        for name, child in block.named_children()
        if isinstance(child, (fl.Conv2d, fl.Downsample, fl.Upsample))
        or is_block(child, "ResidualBlock", "CrossAttentionBlock2d")
    ]


def ldm_unet_module_map(unet: fl.Chain) -> dict[str, str]:
    """Our module paths -> LDM module paths (without the "model.diffusion_model." prefix)."""
    mapping = {
        "TimestepEncoder.RangeEncoder.Linear_1": "time_embed.0",
        "TimestepEncoder.RangeEncoder.Linear_2": "time_embed.2",
    }
    if unet.config.addition_embedding == "text_time":
        mapping["TimestepEncoder.TextTimeEmbedding.RangeEncoder.Linear_1"] = "label_emb.0.0"
        mapping["TimestepEncoder.TextTimeEmbedding.RangeEncoder.Linear_2"] = "label_emb.0.2"
    for section, ldm_section in (("DownBlocks", "input_blocks"), ("UpBlocks", "output_blocks")):
        blocks: fl.Chain = getattr(unet, section)
        for index, (block_name, block) in enumerate(blocks.named_children()):
            for position, (name, child) in enumerate(unet_block_children(block)):  # type: ignore[arg-type]
                ours, theirs = f"{section}.{block_name}.{name}", f"{ldm_section}.{index}.{position}"
                add_unet_child(mapping, ours, theirs, child)
    for position, (name, child) in enumerate(unet.MiddleBlock.named_children()):
        add_unet_child(mapping, f"MiddleBlock.{name}", f"middle_block.{position}", child)
    mapping["OutputBlock.GroupNorm"] = "out.0"
    mapping["OutputBlock.Conv2d"] = "out.2"
    return mapping


def add_unet_child(mapping: dict[str, str], ours: str, theirs: str, child: fl.Module) -> None:
    if isinstance(child, fl.Conv2d):
        mapping[ours] = theirs
    elif is_block(child, "ResidualBlock"):
        add_block(mapping, ours, theirs, UNET_RESIDUAL_BLOCK, child)
    elif is_block(child, "CrossAttentionBlock2d"):
        add_block(mapping, ours, theirs, spatial_transformer_table(child), child)
    elif isinstance(child, fl.Downsample):
        mapping[f"{ours}.Conv2d"] = f"{theirs}.op"
    elif isinstance(child, fl.Upsample):
        mapping[f"{ours}.Conv2d"] = f"{theirs}.conv"


def ldm_unet_key_map(unet: fl.Chain) -> dict[str, str]:
    """`{LDM UNet key without prefix: our key}` for every tensor of `unet`."""
    return expand_module_map(unet, ldm_unet_module_map(unet))


def ldm_autoencoder_module_map(autoencoder: fl.Chain) -> dict[str, str]:
    """Our module paths -> LDM module paths (without the "first_stage_model." prefix)."""
    mapping: dict[str, str] = {}
    encoder = find_block(autoencoder, "Encoder")
    levels = len(autoencoder.config.block_channels)
    children = list(encoder.named_children())
    mapping[f"Encoder.{children[0][0]}"] = "encoder.conv_in"
    for level, (name, chain) in enumerate(children[1 : 1 + levels]):
        _add_autoencoder_level(mapping, f"Encoder.{name}", f"encoder.down.{level}", chain, "downsample")
    _add_autoencoder_middle(
        mapping, f"Encoder.{children[1 + levels][0]}", "encoder.mid", children[1 + levels][1]
    )
    mapping[f"Encoder.{children[2 + levels][0]}.GroupNorm"] = "encoder.norm_out"
    mapping[f"Encoder.{children[2 + levels][0]}.Conv2d"] = "encoder.conv_out"
    mapping[f"Encoder.{children[3 + levels][0]}"] = "quant_conv"

    decoder = find_block(autoencoder, "Decoder")
    children = list(decoder.named_children())
    mapping[f"Decoder.{children[0][0]}"] = "post_quant_conv"
    mapping[f"Decoder.{children[1][0]}"] = "decoder.conv_in"
    _add_autoencoder_middle(mapping, f"Decoder.{children[2][0]}", "decoder.mid", children[2][1])
    for index, (name, chain) in enumerate(
        children[3 : 3 + levels]
    ):  # deepest level first; LDM numbers from the top
        _add_autoencoder_level(
            mapping, f"Decoder.{name}", f"decoder.up.{levels - 1 - index}", chain, "upsample"
        )
    mapping[f"Decoder.{children[3 + levels][0]}.GroupNorm"] = "decoder.norm_out"
    mapping[f"Decoder.{children[3 + levels][0]}.Conv2d"] = "decoder.conv_out"
    return mapping


def _add_autoencoder_level(
    mapping: dict[str, str], ours: str, theirs: str, level: Module, sampler: str
) -> None:
    residual_blocks = [
        (name, child) for name, child in level.named_children() if is_block(child, "ResidualBlock")
    ]
    for index, (name, block) in enumerate(residual_blocks):
        add_block(mapping, f"{ours}.{name}", f"{theirs}.block.{index}", AUTOENCODER_RESIDUAL_BLOCK, block)
    for name, child in level.named_children():
        if isinstance(child, (fl.Downsample, fl.Upsample)):
            mapping[f"{ours}.{name}.Conv2d"] = f"{theirs}.{sampler}.conv"


def _add_autoencoder_middle(mapping: dict[str, str], ours: str, theirs: str, middle: Module) -> None:
    for name, child in middle.named_children():
        if is_block(child, "AttentionBlock2d"):
            add_block(mapping, f"{ours}.{name}", f"{theirs}.attn_1", AUTOENCODER_ATTENTION, child)
        else:
            block_number = int(name.rsplit("_", 1)[1])  # ResidualBlock_1 / _2 -> block_1 / block_2
            add_block(
                mapping, f"{ours}.{name}", f"{theirs}.block_{block_number}", AUTOENCODER_RESIDUAL_BLOCK, child
            )


def ldm_autoencoder_key_map(autoencoder: fl.Chain) -> dict[str, str]:
    """`{LDM autoencoder key without prefix: our key}` for every tensor of `autoencoder`."""
    return expand_module_map(autoencoder, ldm_autoencoder_module_map(autoencoder))
