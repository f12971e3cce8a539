"""The UNet equals diffusers' UNet2DConditionModel on the same random weights (fp32, CPU).

Weights go from diffusers to ours through the explicit key map (`diffusers_unet_key_map`) and are
loaded on a meta-built UNet with `assign=True`. Measured max abs differences (torch 2.13 CPU, weights
~N(0, 0.05)): tiny SD1.5 3.4e-7 and tiny SDXL 7e-8 (outputs up to 0.3), full SD1.5 3.0e-6 (batch 2, 32x32
latents, outputs up to 0.53), full SDXL 0.0 (batch 1, 32x32). Tolerances: tests/support/parity.py (`unet`, `unet_sd15_full`, `unet_sdxl_full`).
"""

from __future__ import annotations

import gc
import os
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

import fluxion.layers as fl
from fluxion.model_converter import convert_by_tracing
from foundationals.formats.diffusers import diffusers_unet_key_map
from foundationals.latent_diffusion.model_config import UNET_PRESETS, UNetConfig
from foundationals.latent_diffusion.unet import (
    CrossAttentionBlock,
    CrossAttentionBlock2d,
    ResidualAccumulator,
    SelfAttentionBlock,
    UNet,
)
from tests.support.parity import assert_parity

SLOW = pytest.mark.skipif(os.environ.get("FLUXION_SLOW") != "1", reason="full-size model: set FLUXION_SLOW=1")


def diffusers_kwargs(config: UNetConfig) -> dict[str, Any]:
    """The diffusers config of the same architecture, written out by hand from diffusers' documentation."""
    levels = len(config.block_channels)
    attention = [depth > 0 for depth in config.transformer_depth]
    if config.attention_head_dim is not None:
        heads: Any = [width // config.attention_head_dim for width in config.block_channels]
    else:
        heads = config.num_attention_heads
    kwargs: dict[str, Any] = dict(
        sample_size=16,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        # diffusers reads the middle depth from the last entry
        transformer_layers_per_block=[max(d, 1) for d in config.transformer_depth[:-1]]
        + [config.middle_transformer_depth],
        cross_attention_dim=config.context_dim,
        attention_head_dim=heads,  # diffusers' historical name for the number of heads
        use_linear_projection=config.use_linear_projection,
        norm_num_groups=config.num_groups,
    )
    if config.addition_embedding == "text_time":
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=config.time_id_embedding_dim,
            projection_class_embeddings_input_dim=config.addition_embedding_dim,
        )
    assert levels == len(kwargs["down_block_types"])
    return kwargs


def reference_and_ours(config: UNetConfig, seed: int = 0) -> tuple[UNet2DConditionModel, UNet]:
    torch.manual_seed(seed)
    reference = UNet2DConditionModel(**diffusers_kwargs(config)).eval()
    for parameter in reference.parameters():  # diffusers zero-inits some layers: make every weight count
        parameter.data.normal_(0, 0.05 if parameter.dim() > 1 else 0.1)
    unet = UNet(config, device="meta")
    key_map = diffusers_unet_key_map(unet)
    state = reference.state_dict()
    unet.load_state_dict({ours: state[theirs] for theirs, ours in key_map.items()}, assign=True)
    return reference, unet


def conditioning(config: UNetConfig, batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    inputs = {
        "x": torch.randn(batch, config.in_channels, height, width, generator=generator),
        "timestep": torch.tensor([999.0, 3.5, 500.0][:batch]),
        "text": torch.randn(batch, 7, config.context_dim, generator=generator),
    }
    if config.addition_embedding == "text_time":
        inputs["pooled"] = torch.randn(batch, config.pooled_text_dim, generator=generator)
        inputs["time_ids"] = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]])[
            :batch
        ]
    return inputs


def run_both(reference: UNet2DConditionModel, unet: UNet, inputs: dict[str, torch.Tensor], **extra: Any):
    added = None
    if "pooled" in inputs:
        added = {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
        unet.set_pooled_text_embedding(inputs["pooled"])
        unet.set_time_ids(inputs["time_ids"])
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["text"])
    with torch.no_grad():
        expected = reference(
            inputs["x"], inputs["timestep"], inputs["text"], added_cond_kwargs=added, **extra
        ).sample
        actual = unet(inputs["x"])
    return expected, actual


@pytest.mark.parametrize("size", [(16, 16), (12, 20), (13, 18)])
def test_tiny_sd15_unet_matches_diffusers(size):
    config = UNET_PRESETS["tiny"]
    reference, unet = reference_and_ours(config)
    expected, actual = run_both(reference, unet, conditioning(config, 2, *size))
    assert actual.shape == expected.shape
    assert_parity("unet", actual, expected)  # odd sizes use the Downsample shapes


def test_tiny_sd15_inpainting_unet_matches_diffusers():
    config = UNET_PRESETS["tiny"].with_changes(in_channels=9)
    reference, unet = reference_and_ours(config)
    expected, actual = run_both(reference, unet, conditioning(config, 2, 16, 16))
    assert_parity("unet", actual, expected)


def test_tiny_sdxl_unet_matches_diffusers():
    config = UNET_PRESETS["tiny_sdxl"]
    reference, unet = reference_and_ours(config)
    expected, actual = run_both(reference, unet, conditioning(config, 2, 16, 16))
    assert_parity("unet", actual, expected)


def test_scalar_timestep_broadcasts_over_the_batch():
    config = UNET_PRESETS["tiny"]
    reference, unet = reference_and_ours(config)
    inputs = conditioning(config, 2, 16, 16)
    inputs["timestep"] = torch.tensor(250)
    expected, actual = run_both(reference, unet, inputs)
    assert_parity("unet", actual, expected)


def test_control_residuals_match_diffusers_additional_residuals():
    """The ControlNet seam: residuals added to every skip connection and to the middle block output."""
    config = UNET_PRESETS["tiny"]
    reference, unet = reference_and_ours(config)
    inputs = conditioning(config, 2, 16, 16)
    generator = torch.Generator().manual_seed(3)
    shapes = [(32, 16), (32, 16), (32, 16), (32, 8), (64, 8), (64, 8), (64, 4), (64, 4), (64, 4)]
    down = [torch.randn(2, c, s, s, generator=generator) for c, s in shapes]
    middle = torch.randn(2, 64, 4, 4, generator=generator)
    assert unet.skip_connection_count == len(down)
    unet.set_control_residuals([*down, middle])
    expected, actual = run_both(
        reference,
        unet,
        inputs,
        down_block_additional_residuals=tuple(down),
        mid_block_additional_residual=middle,
    )
    assert_parity("unet", actual, expected)
    unet.set_control_residuals(None)
    expected, actual = run_both(reference, unet, inputs)
    assert_parity("unet", actual, expected)


def test_key_map_agrees_with_tracing_conversion():
    """An independent route: fluxion's tracing converter pairs layers by execution order."""
    config = UNET_PRESETS["tiny_sdxl"]
    reference, _ = reference_and_ours(config)
    traced = UNet(config)
    inputs = conditioning(config, 2, 16, 16)
    traced.set_timestep(inputs["timestep"])
    traced.set_clip_text_embedding(inputs["text"])
    traced.set_pooled_text_embedding(inputs["pooled"])
    traced.set_time_ids(inputs["time_ids"])
    report = convert_by_tracing(
        reference,
        traced,
        (inputs["x"], inputs["timestep"], inputs["text"]),
        target_args=(inputs["x"],),
        source_kwargs={
            "added_cond_kwargs": {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
        },
        check_tolerance=2e-5,
    )
    assert report.mapping == diffusers_unet_key_map(traced)


def test_tree_exposes_blocks_for_adapters():
    unet = UNet(UNET_PRESETS["sd15"], device="meta")
    cross_attention = list(unet.layers(CrossAttentionBlock))
    assert len(cross_attention) == 16  # 6 down + 1 middle + 9 up, as IP-Adapter's 16 to_k_ip/to_v_ip pairs
    for block in cross_attention:
        attention = block.ensure_find(fl.Attention)
        assert (attention.key_embedding_dim, attention.num_heads) == (768, 8)
        assert [use.key for use in block.layers(fl.UseContext)] == ["clip_text_embedding"] * 2
    assert len(list(unet.layers(SelfAttentionBlock))) == 16
    assert len(list(unet.layers(CrossAttentionBlock2d))) == 16
    assert [accumulator.index for accumulator in unet.layers(ResidualAccumulator)] == list(range(12))
    assert sum(p.numel() for p in unet.parameters()) == 859_520_964


def test_missing_text_embedding_names_the_context():
    unet = UNet(UNET_PRESETS["tiny"])
    unet.set_timestep(10)
    with pytest.raises(fl.ChainError, match="clip_text_embedding"):
        unet(torch.randn(1, 4, 8, 8))


def test_sdxl_inputs_are_refused_by_an_sd15_unet():
    with pytest.raises(ValueError, match="text_time"):
        UNet(UNET_PRESETS["tiny"], device="meta").set_time_ids(torch.zeros(1, 6))


def test_full_size_sd15_unet_matches_diffusers():
    """Every CI run: the real SD1.5 architecture (860M parameters), one call at batch 2 on a 16x16 latent."""
    config = UNET_PRESETS["sd15"]
    reference, unet = reference_and_ours(config)
    expected, actual = run_both(reference, unet, conditioning(config, 2, 16, 16))
    del reference, unet
    gc.collect()
    assert_parity("unet_sd15_full", actual, expected)


@SLOW
def test_full_size_sdxl_unet_matches_diffusers():
    config = UNET_PRESETS["sdxl_base"]
    reference, unet = reference_and_ours(config)
    expected, actual = run_both(reference, unet, conditioning(config, 1, 32, 32))
    assert_parity("unet_sdxl_full", actual, expected)
