"""Reference-only control: exact no-ops, a hand-computed attention case, the identity property, exact undo."""

from __future__ import annotations

import math

import pytest
import torch

import fluxion.layers as fl
from foundationals.latent_diffusion.adapters.reference_only import (
    ReferenceAdaIN,
    ReferenceAttention,
    ReferenceOnly,
    ReferenceOnlyPatch,
    self_attention_blocks_by_width,
)
from foundationals.latent_diffusion.model_config import UNET_PRESETS
from foundationals.latent_diffusion.unet import (
    DownBlocks,
    MiddleBlock,
    ResidualAccumulator,
    SelfAttentionBlock,
    UNet,
    UpBlocks,
)
from tests.foundationals.latent_diffusion.test_unet import conditioning, reference_and_ours
from tests.support.parity import assert_parity
from tests.support.tiny_ip_adapter import sample_with_patches
from tests.support.tiny_sd import (
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)


@pytest.fixture(scope="module")
def sd():
    return ours_from_diffusers(diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder())


@pytest.fixture(scope="module")
def reference_latents(sd):
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return sd.encode_image(image)


def trajectory(sd, patches, steps=4):
    latents: list[torch.Tensor] = []
    sample_with_patches(
        sd, patches, steps=steps, decode=False, callback=lambda d, t, x: latents.append(x.clone())
    )
    return latents


def test_strength_zero_equals_no_adapter_exactly(sd, reference_latents):
    plain = trajectory(sd, [])
    zero = trajectory(sd, [ReferenceOnlyPatch(reference_latents, strength=0.0)])
    assert all(torch.equal(a, b) for a, b in zip(zero, plain))
    full = trajectory(sd, [ReferenceOnlyPatch(reference_latents, strength=1.0)])
    assert (full[-1] - plain[-1]).abs().max().item() > 1e-3


def test_outside_the_window_the_trajectory_equals_no_adapter(sd, reference_latents):
    plain = trajectory(sd, [], steps=4)
    late = trajectory(sd, [ReferenceOnlyPatch(reference_latents, start=0.5)], steps=4)
    assert torch.equal(late[0], plain[0]) and torch.equal(late[1], plain[1])
    assert (late[2] - plain[2]).abs().max().item() > 1e-4


def test_undo_restores_the_unet_exactly(sd, reference_latents):
    before, contexts = repr(sd.unet), sorted(sd.unet.provider.contexts)
    plain = trajectory(sd, [])
    trajectory(sd, [ReferenceOnlyPatch(reference_latents, style_fidelity=0.3)])
    assert repr(sd.unet) == before and sorted(sd.unet.provider.contexts) == contexts
    assert all(torch.equal(a, b) for a, b in zip(trajectory(sd, []), plain))


def test_strength_enables_the_widest_blocks_first():
    unet = UNet(UNET_PRESETS["tiny"], device="meta")
    blocks = self_attention_blocks_by_width(unet)
    widths = [block.ensure_find(fl.LayerNorm).normalized_shape[0] for block in blocks]
    assert widths == sorted(widths, reverse=True) and len(blocks) == 11
    control = ReferenceOnly(unet, torch.zeros(1, 4, 8, 8, device="meta"), strength=0.5)
    enabled = [attention.enabled for attention in control.attentions]
    assert enabled == [index / 11 < 0.5 for index in range(11)]  # 6 of 11: the 64-wide blocks
    control.eject()


def hand_attention(query_tokens, memory_tokens):
    """Single head, identity projections: softmax(q m^T / sqrt(d)) m, row by row in plain Python."""
    rows = []
    for q in query_tokens.tolist():
        scores = [sum(a * b for a, b in zip(q, m)) / math.sqrt(len(q)) for m in memory_tokens.tolist()]
        top = max(scores)
        weights = [math.exp(s - top) for s in scores]
        total = sum(weights)
        rows.append(
            [sum(w * m[j] for w, m in zip(weights, memory_tokens.tolist())) / total for j in range(len(q))]
        )
    return torch.tensor(rows)


def test_reference_attention_by_hand():
    attention = fl.SelfAttention(2, num_heads=1, use_bias=False)
    with torch.no_grad():
        for linear in attention.layers(fl.Linear):
            linear.weight.copy_(torch.eye(2))
            if linear.bias is not None:
                linear.bias.zero_()
    root = fl.Chain(attention)
    root.set_context("reference", {"mode": "write", "style_fidelity": 0.25, "uses_guidance": True})
    adapter = ReferenceAttention(attention, "reference").inject(root)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [1.0, -1.0]]])
    reference = torch.tensor([[[3.0, 1.0]], [[-1.0, 2.0]]])
    adapter(reference)  # write: stores the reference tokens
    root.use_context("reference")["mode"] = "read"
    output = adapter(x)
    with_reference = [hand_attention(x[i], torch.cat([x[i], reference[i]])) for i in range(2)]
    plain = hand_attention(x[0], x[0])
    # batch item 0 is the unconditional half: 0.25 plain + 0.75 with the reference; item 1 keeps the reference
    assert torch.allclose(output[0], 0.25 * plain + 0.75 * with_reference[0], atol=1e-6)
    assert torch.allclose(output[1], with_reference[1], atol=1e-6)
    adapter.eject()
    assert list(root) == [attention]


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_a_reference_identical_to_the_generation_changes_nothing(preset):
    """Keys/values [x; x] give the same attention as [x]: the UNet output is unchanged (SD1.5 and SDXL)."""
    config = UNET_PRESETS[preset]
    _, unet = reference_and_ours(config)
    with torch.no_grad():  # sharper self-attention than the shared random weights, so references matter
        for block in unet.layers(SelfAttentionBlock):
            for linear in block.layers(fl.Linear):
                linear.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(6))
    inputs = conditioning(config, 2, 16, 16)
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["text"])
    if "pooled" in inputs:
        unet.set_pooled_text_embedding(inputs["pooled"])
        unet.set_time_ids(inputs["time_ids"])
    with torch.no_grad():
        plain = unet(inputs["x"])
        control = ReferenceOnly(unet, inputs["x"][:1], strength=1.0, style_fidelity=0.0)
        control.reference_pass.noised_reference = lambda timestep, batch: inputs["x"]
        control.set_active(True)
        same = unet(inputs["x"])
        other = torch.randn(inputs["x"].shape, generator=torch.Generator().manual_seed(5)) * 3
        control.reference_pass.noised_reference = lambda timestep, batch: other
        different = unet(inputs["x"])
        control.eject()
    assert (same - plain).abs().max().item() < 1e-5  # measured ~1e-7
    assert (different - plain).abs().max().item() > 1e-4  # measured 6e-4 (tiny)


def test_inpainting_unets_are_refused_and_left_unchanged():
    unet = UNet(UNET_PRESETS["tiny"].with_changes(in_channels=9), device="meta")
    before = repr(unet)
    with pytest.raises(ValueError, match="inpainting UNets are not supported"):
        ReferenceOnly(unet, torch.zeros(1, 4, 8, 8, device="meta"))
    assert repr(unet) == before


# --- AdaIN modes (Advanced-ControlNet's reference_adain / reference_attn+adain) ---


def hand_adain(x, reference):
    """Per channel: population mean / variance over the pixels, std = sqrt(max(var, 1e-6)), by hand."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            values, ref = x[b, c].flatten().tolist(), reference[b, c].flatten().tolist()
            mean, ref_mean = sum(values) / len(values), sum(ref) / len(ref)
            var = sum((v - mean) ** 2 for v in values) / len(values)
            ref_var = sum((v - ref_mean) ** 2 for v in ref) / len(ref)
            std, ref_std = max(var, 1e-6) ** 0.5, max(ref_var, 1e-6) ** 0.5
            out[b, c] = (x[b, c] - mean) / std * ref_std + ref_mean
    return out


@pytest.mark.parametrize("adain_strength", [1.0, 0.6])
def test_reference_adain_by_hand(adain_strength):
    root = fl.Chain(fl.Identity())
    state = {"mode": "write", "style_fidelity": 0.25, "uses_guidance": True, "adain_strength": adain_strength}
    root.set_context("reference", state)
    adain = ReferenceAdaIN("reference", 0.0)
    root.append(adain)
    generator = torch.Generator().manual_seed(4)
    reference = torch.randn(2, 3, 4, 5, generator=generator) * 2 + 1
    x = torch.randn(2, 3, 4, 5, generator=generator) * 0.5 - 1
    x[1, 2] = 0.25  # a constant channel: its variance is clamped to 1e-6
    root(reference)
    root.use_context("reference")["mode"] = "read"
    output = root(x)
    renormalised = adain_strength * hand_adain(x, reference) + (1 - adain_strength) * x
    # row 0 is the unconditional half: 0.25 plain + 0.75 AdaIN; row 1 (conditional) keeps the AdaIN
    assert_parity(
        "reference_adain", output, torch.stack([0.25 * x[0] + 0.75 * renormalised[0], renormalised[1]])
    )
    assert torch.allclose(hand_adain(x, reference)[0].mean((1, 2)), reference[0].mean((1, 2)), atol=1e-5)


def test_adain_blocks_and_weights_are_the_references_tables():
    def enabled(preset, strength=1.0):
        unet = UNet(UNET_PRESETS[preset], device="meta")
        control = ReferenceOnly(unet, torch.zeros(1, 4, 8, 8, device="meta"), strength=strength, mode="adain")
        down, middle, up = (
            unet.ensure_find(DownBlocks),
            unet.ensure_find(MiddleBlock),
            unet.ensure_find(UpBlocks),
        )
        where = []
        for block, _, module in control.adain_sites:
            assert module in block
            if block is middle:
                where.append("middle")
            elif any(block is child for child in down):
                where.append(f"in{list(down).index(block)}")
                assert isinstance(list(block)[-1], ResidualAccumulator)  # before the skip is stored
            else:
                where.append(f"out{list(up).index(block)}")
        assert not any(attention.enabled for attention in control.attentions)
        before = repr(unet)
        control.eject()
        assert repr(unet) != before and not list(unet.layers(ReferenceAdaIN))
        return where

    # weights 2(1 - w/6) for inputs 4, 5, 7, 8, 10, 11; 2w/8 for outputs 0-7; middle 0: used when strength > weight
    assert enabled("sd15") == ["middle", "in10", "in11", "out0", "out1", "out2", "out3"]
    assert enabled("sdxl_base") == ["middle", "in8", "out0", "out1", "out2"]
    assert enabled("tiny") == ["middle", "in8", "out0", "out1", "out2"]
    assert len(enabled("sd15", strength=2.5)) == 1 + 6 + 8 and enabled("sd15", strength=0.0) == []


def test_attn_mode_is_the_default_and_adain_modes_change_the_trajectory(sd, reference_latents):
    plain = trajectory(sd, [])
    attn = trajectory(sd, [ReferenceOnlyPatch(reference_latents)])
    assert all(
        torch.equal(a, b)
        for a, b in zip(trajectory(sd, [ReferenceOnlyPatch(reference_latents, mode="attn")]), attn)
    )
    adain = trajectory(sd, [ReferenceOnlyPatch(reference_latents, mode="adain")])
    both = trajectory(sd, [ReferenceOnlyPatch(reference_latents, mode="attn+adain")])
    for one, other in [(adain, plain), (adain, attn), (both, attn), (both, adain)]:
        assert (one[-1] - other[-1]).abs().max().item() > 1e-4
    zero = trajectory(sd, [ReferenceOnlyPatch(reference_latents, mode="attn+adain", strength=0.0)])
    assert all(torch.equal(a, b) for a, b in zip(zero, plain))


@pytest.mark.parametrize("mode", ["adain", "attn+adain"])
def test_adain_modes_undo_exactly_and_a_reference_identical_to_the_generation_changes_nothing(sd, mode):
    before, contexts = repr(sd.unet), sorted(sd.unet.provider.contexts)
    unet = sd.unet
    config = unet.config
    inputs = conditioning(config, 2, 8, 8)
    unet.set_timestep(inputs["timestep"])
    unet.set_clip_text_embedding(inputs["text"])
    with torch.no_grad():
        plain = unet(inputs["x"])
        control = ReferenceOnly(unet, inputs["x"][:1], strength=1.0, style_fidelity=0.0, mode=mode)
        assert any(attention.enabled for attention in control.attentions) == (mode == "attn+adain")
        control.reference_pass.noised_reference = lambda timestep, batch: inputs["x"]
        control.set_active(True)
        same = unet(inputs["x"])
        control.reference_pass.noised_reference = lambda timestep, batch: inputs["x"] * 3 + 1
        different = unet(inputs["x"])
        control.eject()
    assert (same - plain).abs().max().item() < 1e-5  # AdaIN to its own statistics, keys/values [x; x]
    assert (different - plain).abs().max().item() > 1e-4
    assert repr(sd.unet) == before and sorted(sd.unet.provider.contexts) == contexts


def test_a_wrong_mode_is_refused():
    with pytest.raises(ValueError, match="mode must be one of attn, adain, attn\\+adain"):
        ReferenceOnlyPatch(torch.zeros(1, 4, 8, 8), mode="style")
    with pytest.raises(ValueError, match="adain_strength must be within 0..1"):
        ReferenceOnlyPatch(torch.zeros(1, 4, 8, 8), adain_strength=2.0)


def test_a_second_attention_sharing_adapter_is_refused_before_anything_is_injected():
    from foundationals.latent_diffusion.adapters.style_aligned import StyleAligned

    unet = UNet(UNET_PRESETS["tiny"], device="meta")
    plain = repr(unet)
    first = ReferenceOnly(unet, torch.zeros(1, 4, 8, 8, device="meta"))
    before = repr(unet)
    with pytest.raises(
        ValueError, match="reference-only cannot go on a model whose self-attention already carries"
    ):
        ReferenceOnly(unet, torch.zeros(1, 4, 8, 8, device="meta"))
    with pytest.raises(ValueError, match="StyleAligned cannot go on .* ReferenceAttention"):
        StyleAligned(unet)
    assert repr(unet) == before
    adain = ReferenceOnly(
        unet, torch.zeros(1, 4, 8, 8, device="meta"), mode="adain"
    )  # no attention of its own
    adain.eject()
    first.eject()
    assert repr(unet) == plain
