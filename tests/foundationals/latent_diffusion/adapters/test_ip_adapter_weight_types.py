"""IP-Adapter weight types and per-block weights equal diffusers' per-block `set_ip_adapter_scale` (dict form).

One UNet call of tiny SDXL (the real SDXL block layout: attentions in down_blocks.1/2, up_blocks.0/1, the
middle) and of a tiny four-level SD1.5-layout UNet, with identical random IP-Adapter weights. diffusers'
projection is replaced by the identity so both sides attend to the same image tokens. The diffusers scale
dicts are written out here by hand from ComfyUI_IPAdapter_plus' tables (its block numbers follow ComfyUI's
`transformer_index`: the spatial transformers in run order, down, middle, up), never from our table.

The "precise" variants attend to other tokens in some blocks (the reference in the negative rows, zeros in the
positive rows), which one diffusers IP-Adapter cannot express: the reference is two diffusers IP-Adapters with
the same weights, one fed the normal tokens on the other blocks, one fed the swapped tokens on the swapped
blocks. Tolerance: tests/support/parity.py (`ip_adapter_weight_types`).
"""

from __future__ import annotations

import types

import pytest
import torch
from diffusers.loaders import IPAdapterMixin

from foundationals.latent_diffusion.adapters.ip_adapter import (
    WEIGHT_TYPES,
    ImageEmbeddings,
    IPAdapterPatch,
    block_weights,
    ip_adapter_from_state_dict,
    spatial_transformers,
)
from foundationals.latent_diffusion.model_config import TINY_UNET, UNET_PRESETS
from foundationals.latent_diffusion.unet import UNet, cross_attention_blocks
from tests.foundationals.latent_diffusion.test_unet import conditioning, reference_and_ours
from tests.support.parity import assert_parity
from tests.support.tiny_ip_adapter import cross_attention_widths, tencent_ip_adapter

SDXL = UNET_PRESETS["tiny_sdxl"]
SD15_LAYOUT = TINY_UNET.with_changes(block_channels=(32, 32, 64, 64), transformer_depth=(1, 1, 1, 0))
W, C = 0.8, 0.6  # weight and weight_composition


def ease_in(t: int, n: int) -> float:
    return 0.05 + 0.95 * (1 - t / n)


def sdxl_dicts() -> dict[str, dict]:
    """ComfyUI_IPAdapter_plus' SDXL tables as diffusers scale dicts: run-order blocks 0-3 are down_blocks.1/2,
    4 the middle, 5-7 up_blocks.0, 8-10 up_blocks.1."""
    f = [W * ease_in(t, 11) for t in range(11)]
    return {
        "style transfer": {"up": {"block_0": [0.0, W, 0.0]}},
        "composition": {"down": {"block_2": [0.0, W]}},
        "style and composition": {"down": {"block_2": [0.0, C]}, "up": {"block_0": [0.0, W, 0.0]}},
        "strong style transfer": {
            "down": {"block_1": [W, W], "block_2": [W, 0.0]},
            "mid": W,
            "up": {"block_0": [W, W, W], "block_1": [W, W, W]},
        },
        "weak input": {"down": 0.2 * W, "mid": W, "up": W},
        "weak middle": {"down": W, "mid": 0.2 * W, "up": W},
        "strong middle": {"down": 0.2 * W, "mid": W, "up": 0.2 * W},
        "ease in": {
            "down": {"block_1": f[0:2], "block_2": f[2:4]},
            "mid": f[4],
            "up": {"block_0": f[5:8], "block_1": f[8:11]},
        },
        "linear": {"down": W, "mid": W, "up": W},
    }


def sd15_dicts() -> dict[str, dict]:
    """The SD1.5 tables: run-order 0-5 down_blocks.0-2, 6 the middle, 7-9 up_blocks.1, 10-12 .2, 13-15 .3."""
    style = {"down": {"block_0": [W, W], "block_1": [W, W]}, "up": {"block_1": [0.0, 0.0, W], "block_2": W}}
    style["up"]["block_3"] = W
    return {
        "style transfer": style,
        "composition": {"down": {"block_2": [0.25 * W, W]}},
        "style and composition": {
            "down": {"block_0": [W, W], "block_1": [W, W], "block_2": [0.25 * C, C]},
            "up": style["up"],
        },
        "weak output": {"down": W, "mid": W, "up": 0.2 * W},
    }


def setup(config, seed: int):
    reference, unet = reference_and_ours(config)
    weights = tencent_ip_adapter("base", cross_attention_widths(reference), config.context_dim, seed=seed)
    reference._load_ip_adapter_weights([weights, weights])  # two copies: the precise variants need both
    for index in range(2):  # diffusers attends to our tokens as they are
        reference.encoder_hid_proj.image_projection_layers[index] = torch.nn.Identity()
    flat = {f"{group}.{key}": value for group, items in weights.items() for key, value in items.items()}
    adapter = ip_adapter_from_state_dict(flat, "tiny")
    inputs = conditioning(config, 2, 16, 16)
    generator = torch.Generator().manual_seed(seed + 1)
    tokens = 3 * torch.randn(2, 4, config.context_dim, generator=generator)  # rows: negative, positive
    return reference, unet, adapter, inputs, tokens


def run_reference(reference, inputs, scales: list, token_sets: list[torch.Tensor]) -> torch.Tensor:
    IPAdapterMixin.set_ip_adapter_scale(types.SimpleNamespace(unet=reference), scales)
    added = {"image_embeds": [tokens[:, None] for tokens in token_sets]}
    if "pooled" in inputs:
        added |= {"text_embeds": inputs["pooled"], "time_ids": inputs["time_ids"]}
    with torch.no_grad():
        return reference(inputs["x"], inputs["timestep"], inputs["text"], added_cond_kwargs=added).sample


def run_ours(unet: UNet, adapter, inputs, tokens, weights, swapped=None) -> torch.Tensor:
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["text"])
    if "pooled" in inputs:
        unet.set_pooled_text_embedding(inputs["pooled"])
        unet.set_time_ids(inputs["time_ids"])
    injection = adapter.inject(unet)
    try:
        injection.set_tokens(tokens)
        injection.set_block_weights(weights)
        injection.set_swapped_tokens(swapped)
        with torch.no_grad():
            return unet(inputs["x"])
    finally:
        injection.eject()


@pytest.fixture(scope="module")
def sdxl():
    return setup(SDXL, 3)


@pytest.fixture(scope="module")
def sd15():
    return setup(SD15_LAYOUT, 5)


def test_run_order_names_follow_comfyui_transformer_index():
    names = [place.name for place in spatial_transformers(UNET_PRESETS["sdxl_base"])]
    assert (
        len(names) == 11
        and names[3] == "down_blocks.2.attentions.1"
        and names[6] == "up_blocks.0.attentions.1"
    )
    names = [place.name for place in spatial_transformers(UNET_PRESETS["sd15"])]
    assert len(names) == 16 and names[4:7] == [
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "mid_block.attentions.0",
    ]
    assert len(block_weights(UNET_PRESETS["sdxl_base"], 1.0).scales) == 70
    sdxl = block_weights(UNET_PRESETS["sdxl_base"], 1.0, "style transfer")
    assert sum(scale > 0 for scale in sdxl.scales) == 10  # up_blocks.0.attentions.1: 10 transformer blocks


@pytest.mark.parametrize("weight_type", list(sdxl_dicts()))
def test_sdxl_weight_types_match_diffusers_block_scales(sdxl, weight_type):
    reference, unet, adapter, inputs, tokens = sdxl
    expected = run_reference(reference, inputs, [sdxl_dicts()[weight_type], 0.0], [tokens, tokens])
    ours = run_ours(unet, adapter, inputs, tokens, block_weights(SDXL, W, weight_type, C))
    plain = run_reference(reference, inputs, [0.0, 0.0], [tokens, tokens])
    assert (expected - plain).abs().max() > 1e-4  # the adapter acts (10x the tolerance)
    assert_parity("ip_adapter_weight_types", ours, expected)


@pytest.mark.parametrize("weight_type", list(sd15_dicts()))
def test_sd15_weight_types_match_diffusers_block_scales(sd15, weight_type):
    reference, unet, adapter, inputs, tokens = sd15
    expected = run_reference(reference, inputs, [sd15_dicts()[weight_type], 0.0], [tokens, tokens])
    ours = run_ours(unet, adapter, inputs, tokens, block_weights(SD15_LAYOUT, W, weight_type, C))
    assert_parity("ip_adapter_weight_types", ours, expected)


def test_layer_weights_by_number_and_by_name_match_diffusers(sdxl):
    reference, unet, adapter, inputs, tokens = sdxl
    expected = run_reference(
        reference,
        inputs,
        [{"down": {"block_2": [0.0, 0.5 * W]}, "up": {"block_1": [0.0, 0.0, 2 * W]}}, 0.0],
        [tokens, tokens],
    )
    for text in (
        "3:0.5, 10:2",
        "down_blocks.2.attentions.1:0.5, up_blocks.1.attentions.2:2",
        "0,0,0,0.5,0,0,0,0,0,0,2",
    ):
        ours = run_ours(
            unet, adapter, inputs, tokens, block_weights(SDXL, W, "style transfer", layer_weights=text)
        )
        assert_parity("ip_adapter_weight_types", ours, expected)


@pytest.mark.parametrize(
    "weight_type, normal, swapped",
    [
        # style transfer precise: style block normal, composition block swapped (both at W)
        ("style transfer precise", {"up": {"block_0": [0.0, W, 0.0]}}, {"down": {"block_2": [0.0, W]}}),
        # composition precise: composition block normal; every other block swapped, at 0.1 W but the style block
        (
            "composition precise",
            {"down": {"block_2": [0.0, W]}},
            {
                "down": {"block_1": [0.1 * W, 0.1 * W], "block_2": [0.1 * W, 0.0]},
                "mid": 0.1 * W,
                "up": {"block_0": [0.1 * W, W, 0.1 * W], "block_1": [0.1 * W] * 3},
            },
        ),
    ],
)
def test_precise_variants_swap_the_reference_into_the_negative_rows(sdxl, weight_type, normal, swapped):
    reference, unet, adapter, inputs, tokens = sdxl
    swapped_tokens = torch.stack([tokens[1], torch.zeros_like(tokens[1])])  # negative row: the reference
    expected = run_reference(reference, inputs, [normal, swapped], [tokens, swapped_tokens])
    weights = block_weights(SDXL, W, weight_type)
    assert weights.swapped
    ours = run_ours(unet, adapter, inputs, tokens, weights, swapped_tokens)
    unswapped = run_reference(reference, inputs, [normal, swapped], [tokens, tokens])
    assert (expected - unswapped).abs().max() > 1e-4  # the swap matters (measured 2e-4 and more)
    assert_parity("ip_adapter_weight_types", ours, expected)


def test_every_weight_type_resolves_on_both_families():
    for config in (UNET_PRESETS["sd15"], UNET_PRESETS["sdxl_base"], TINY_UNET):
        for weight_type in WEIGHT_TYPES:
            weights = block_weights(config, 1.0, weight_type)
            assert len(weights.scales) == len(cross_attention_blocks(UNet(config, device="meta")))
            assert all(0.0 <= scale <= 1.0 for scale in weights.scales)


def test_bad_layer_weights_get_clear_errors():
    with pytest.raises(ValueError, match="block 11 does not exist"):
        block_weights(SDXL, 1.0, layer_weights="11:1")
    with pytest.raises(ValueError, match="no attention block is named 'up_blocks.5'"):
        block_weights(SDXL, 1.0, layer_weights="up_blocks.5:1")
    with pytest.raises(ValueError, match="lists 3 weights; this UNet has 11"):
        block_weights(SDXL, 1.0, layer_weights="1, 0, 1")
    with pytest.raises(ValueError, match="mixes"):
        block_weights(SDXL, 1.0, layer_weights="1, 3:1")
    with pytest.raises(ValueError, match="not 'block:weight'"):
        block_weights(SDXL, 1.0, layer_weights="3:x")
    with pytest.raises(ValueError, match="unknown IP-Adapter weight_type 'sideways'"):
        IPAdapterPatch(
            ip_adapter_from_state_dict(
                {
                    f"{g}.{k}": v
                    for g, d in tencent_ip_adapter("base", [32] * 11, 32).items()
                    for k, v in d.items()
                }
            ),
            ImageEmbeddings(torch.zeros(1, 24), torch.zeros(1, 24), "image_embeds"),
            weight_type="sideways",
        )
