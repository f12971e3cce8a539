"""Key maps between original single-file checkpoints (CompVis/Stability LDM layout) and our UNet and autoencoder.

A map is built from a model instance (the meta-device one the loader is about to fill), block by
block: a walk pairs each of our blocks with its LDM prefix, and a table per block type pairs their
children. `ldm_unet_key_map(unet)` and `ldm_autoencoder_key_map(autoencoder)` return
`{ldm key (without "model.diffusion_model." / "first_stage_model."): our state-dict key}`.

The architecture is read from the same keys: `infer_unet_config` / `infer_autoencoder_config` from their
shapes, `detect_family` from the UNet config, and `refuse_other_architectures` for files we do not run.
Our blocks are recognised by class name (`is_block`), so no model class is imported here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import fields

from torch.nn import Module

from ...fluxion import layers as fl
from ..latent_diffusion.model_config import UNET_PRESETS, AutoencoderConfig, UNetConfig

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_AUTOENCODER_PREFIX = "first_stage_model."
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


V_PREDICTION_MARKER = "v_pred"
ZERO_TERMINAL_SNR_MARKER = "ztsnr"
SAMPLING_MARKER_KEYS = frozenset({V_PREDICTION_MARKER, ZERO_TERMINAL_SNR_MARKER})
"""Empty tensors some single files carry to say how to sample them: `v_pred` (the UNet predicts v; ComfyUI writes
it when it saves a v-prediction model) and `ztsnr` (trained on a zero-terminal-SNR schedule). ComfyUI reads them
for SDXL files (ztsnr only beside v_pred); we read both for every family."""


def sampling_markers(keys: Iterable[str]) -> tuple[bool, bool]:
    """(v-prediction, zero terminal SNR) as a single file's marker keys say."""
    present = SAMPLING_MARKER_KEYS.intersection(keys)
    return V_PREDICTION_MARKER in present, ZERO_TERMINAL_SNR_MARKER in present


class CheckpointError(ValueError):
    """A file that is not a loadable SD checkpoint; the message names the file and says what it looks like."""


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


def _add_blocks(mapping: dict[str, str], blocks: fl.Chain, section: str, ldm_section: str) -> None:
    for index, (block_name, block) in enumerate(blocks.named_children()):
        for position, (name, child) in enumerate(unet_block_children(block)):  # type: ignore[arg-type]
            add_unet_child(
                mapping, f"{section}.{block_name}.{name}", f"{ldm_section}.{index}.{position}", child
            )


def ldm_encoder_module_map(model: fl.Chain, config: UNetConfig) -> dict[str, str]:
    """The encoder half a UNet and a ControlNet share: timestep (and SDXL) embedding, input and middle blocks."""
    mapping = {
        "TimestepEncoder.RangeEncoder.Linear_1": "time_embed.0",
        "TimestepEncoder.RangeEncoder.Linear_2": "time_embed.2",
    }
    if config.addition_embedding == "text_time":
        mapping["TimestepEncoder.TextTimeEmbedding.RangeEncoder.Linear_1"] = "label_emb.0.0"
        mapping["TimestepEncoder.TextTimeEmbedding.RangeEncoder.Linear_2"] = "label_emb.0.2"
    _add_blocks(mapping, model.DownBlocks, "DownBlocks", "input_blocks")
    for position, (name, child) in enumerate(model.MiddleBlock.named_children()):
        add_unet_child(mapping, f"MiddleBlock.{name}", f"middle_block.{position}", child)
    return mapping


def ldm_unet_module_map(unet: fl.Chain) -> dict[str, str]:
    """Our module paths -> LDM module paths (without the "model.diffusion_model." prefix)."""
    mapping = ldm_encoder_module_map(unet, unet.config)
    _add_blocks(mapping, unet.UpBlocks, "UpBlocks", "output_blocks")
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


# -- Architecture and family from keys and shapes ------------------------------------------------------------


def count_matches(keys: Iterable[str], pattern: str) -> int:
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
    for index in range(1, count_matches(keys, r"input_blocks\.(\d+)\.") + 1):
        if f"input_blocks.{index}.0.op.weight" in shapes:
            levels.append([])
        elif f"input_blocks.{index}.0.out_layers.3.weight" in shapes:
            width = shapes[f"input_blocks.{index}.0.out_layers.3.weight"][0]
            depth = count_matches(keys, rf"input_blocks\.{index}\.1\.transformer_blocks\.(\d+)\.")
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
        middle_transformer_depth=count_matches(keys, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
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


def refuse_other_architectures(keys: list[str], source: str) -> None:
    """Raise `CheckpointError` for SD3, Flux, SD2.x and files with no LDM UNet, naming what they look like."""

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
    levels = count_matches(keys, r"encoder\.down\.(\d+)\.")
    if levels == 0 or "post_quant_conv.weight" not in shapes:
        raise CheckpointError(f"{source}: incomplete autoencoder (no encoder.down.* or post_quant_conv)")
    try:
        config = AutoencoderConfig(
            image_channels=shapes["encoder.conv_in.weight"][1],
            latent_channels=shapes["post_quant_conv.weight"][0],
            block_channels=tuple(
                shapes[f"encoder.down.{level}.block.0.conv1.weight"][0] for level in range(levels)
            ),
            layers_per_block=count_matches(keys, r"encoder\.down\.0\.block\.(\d+)\."),
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
