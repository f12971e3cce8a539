"""StyleAligned: shared attention vs a hand-written implementation, the properties it guarantees, exact eject.

No reference implementation runs here (refiners and the ComfyUI community nodes are not installed), so:
- one self-attention layer against a torch implementation written in this test from the paper / refiners'
  formulas (AdaIN of queries and keys to the reference, keys/values concatenated, per CFG half);
- a batch of one is the plain run; the reference image's trajectory is the plain one (it attends to itself);
- an external reference latent equal to the batch's first image gives what the in-batch reference gives;
- eject restores the tree, the contexts and every weight bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import fluxion.layers as fl
from foundationals.latent_diffusion.adapters.style_aligned import (
    BATCH,
    READ,
    SharedSelfAttention,
    StyleAligned,
    StyleAlignedPatch,
    adain,
    self_attentions,
)
from foundationals.latent_diffusion.guidance import NEGATIVE, POSITIVE
from foundationals.latent_diffusion.model_config import UNET_PRESETS
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.unet import SelfAttentionBlock, UNet
from tests.foundationals.latent_diffusion.test_unet import conditioning, reference_and_ours
from tests.support.parity import assert_parity
from tests.support.tiny_sd import (
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)


@pytest.fixture(scope="module")
def sd():
    model = ours_from_diffusers(diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder())
    with torch.no_grad():  # sharper self-attention than the random weights, so sharing matters
        for block in model.unet.layers(SelfAttentionBlock):
            for linear in block.layers(fl.Linear):
                linear.weight.normal_(0.0, 0.4, generator=torch.Generator().manual_seed(6))
    return model


def batch_run(sd, patches, batch=3, steps=3, guidance_scale=5.0, seed=0):
    """Latents after each step of a DDIM txt2img of `batch` images (one prompt) with `patches`."""
    positive, negative = sd.encode_prompt("a photo of a cat"), sd.encode_prompt("blurry")
    shape = (batch, sd.latent_channels, 8, 8)
    run = SamplingRun(steps, 0, 8, 8, batch, uses_guidance=guidance_scale > 1.0)
    latents: list[torch.Tensor] = []
    with patched(sd, patches, run), torch.no_grad():
        sd.sample(
            shape,
            positive,
            negative,
            make_solver("ddim", steps, "normal", prediction_type=sd.prediction_type),
            guidance_scale,
            seed,
            callback=lambda done, total, x: latents.append(x.clone()),
            run=run,
        )
    return latents


def hand_shared_attention(attention, x, groups, scale=1.0, adain_qk=(True, True), share_reference=False):
    """Refiners' shared attention written out: projections, AdaIN to each group's first image, concatenation."""
    heads = attention.num_heads
    to_q, to_k, to_v = (linear.weight for linear in list(attention.layers(fl.Linear))[:3])
    out = list(attention.layers(fl.Linear))[3]
    size = x.shape[0] // groups
    rows = []
    for g in range(groups):
        ref = x[g * size]
        q_ref, k_ref, v_ref = ref @ to_q.T, ref @ to_k.T, ref @ to_v.T
        for i in range(size):
            item = x[g * size + i]
            q, k, v = item @ to_q.T, item @ to_k.T, item @ to_v.T
            if i == 0 and not share_reference:
                keys, values = k, v
            else:

                def norm(t, r):
                    return (t - t.mean(0)) / (t.std(0) + 1e-8) * r.std(0) + r.mean(0)

                q = norm(q, q_ref) if adain_qk[0] else q
                k = norm(k, k_ref) if adain_qk[1] else k
                factor = 1.0 if i == 0 else scale
                keys, values = torch.cat([k, factor * k_ref]), torch.cat([v, factor * v_ref])
            width = q.shape[-1] // heads
            merged = []
            for h in range(heads):
                part = slice(h * width, (h + 1) * width)
                scores = q[:, part] @ keys[:, part].T / width**0.5
                merged.append(scores.softmax(-1) @ values[:, part])
            rows.append(torch.cat(merged, -1) @ out.weight.T + out.bias)
    return torch.stack(rows)


def one_layer(state):
    torch.manual_seed(0)
    attention = fl.SelfAttention(8, num_heads=2, use_bias=False)
    for linear in attention.layers(fl.Linear):
        linear.weight.data.normal_(0, 0.6)
    root = fl.Chain(attention)
    root.set_context("style", dict(state, mode=BATCH))
    return attention, root, SharedSelfAttention(attention, "style").inject(root)


STATE = dict(scale=1.0, adain_queries=True, adain_keys=True, adain_values=False, share_reference=False)


@pytest.mark.parametrize(
    "scale, adain_qk, share_reference",
    [
        (1.0, (True, True), False),
        (0.7, (True, True), False),
        (1.3, (False, True), True),
        (1.0, (True, False), True),
    ],
)
def test_shared_attention_equals_the_hand_written_one_per_cfg_half(scale, adain_qk, share_reference):
    state = dict(STATE, scale=scale, adain_queries=adain_qk[0], adain_keys=adain_qk[1])
    state.update(share_reference=share_reference, uses_guidance=True)
    attention, root, adapter = one_layer(state)
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(1))  # [negative x3, positive x3]
    with torch.no_grad():
        ours = root(x)
        expected = hand_shared_attention(attention, x, 2, scale, adain_qk, share_reference)
        assert_parity("style_aligned", ours, expected)  # measured 1.4e-6
        # a pass on one half only: the batch is that half, its first image the reference
        root.use_context("style")["halves"] = (POSITIVE,)
        one_half = root(x[3:])
        assert (
            one_half - hand_shared_attention(attention, x[3:], 1, scale, adain_qk, share_reference)
        ).abs().max() < 1e-5
        root.use_context("style")["halves"] = (NEGATIVE, POSITIVE)
        assert (root(x) - ours).abs().max().item() < 1e-6
    adapter.eject()
    assert list(root) == [attention]


def test_adain_matches_the_reference_statistics():
    features = torch.randn(2, 3, 40, 6, generator=torch.Generator().manual_seed(2)) * 3 + 1
    reference = torch.randn(2, 1, 40, 6, generator=torch.Generator().manual_seed(3)) * 0.5 - 2
    out = adain(features, reference)
    assert torch.allclose(out.mean(-2), reference.mean(-2).expand(2, 3, 6), atol=1e-5)
    assert torch.allclose(out.std(-2), reference.std(-2).expand(2, 3, 6), atol=1e-5)


def test_a_batch_of_one_is_the_plain_run(sd):
    plain = batch_run(sd, [], batch=1)
    aligned = batch_run(sd, [StyleAlignedPatch()], batch=1)
    assert max((a - b).abs().max().item() for a, b in zip(aligned, plain)) <= 1e-6  # same path: measured 0
    # the reference's shared path (refiners': AdaIN to itself, its keys twice) is the plain one up to rounding
    shared = batch_run(sd, [StyleAlignedPatch(share_reference=True)], batch=1)
    assert (
        max((a - b).abs().max().item() for a, b in zip(shared, plain)) < 3e-4
    )  # measured 7.5e-5 after 3 steps


def test_the_reference_image_keeps_its_plain_trajectory_and_the_others_follow_it(sd):
    plain = batch_run(sd, [], batch=3)
    aligned = batch_run(sd, [StyleAlignedPatch()], batch=3)
    assert (aligned[-1][0] - plain[-1][0]).abs().max().item() < 1e-5  # measured 0 (batched rows vs alone)
    assert (aligned[-1][1:] - plain[-1][1:]).abs().max().item() > 1e-3
    # the others move towards the reference: closer to it than without the adapter
    before = (plain[-1][1:] - plain[-1][:1]).abs().mean()
    after = (aligned[-1][1:] - aligned[-1][:1]).abs().mean()
    assert after < before


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
def test_a_reference_latent_equal_to_the_first_image_gives_the_in_batch_result(preset):
    """The reference pass computes the reference's tokens as the batch's first image's: same shared attention."""
    config = UNET_PRESETS[preset]
    _, unet = reference_and_ours(config)
    with torch.no_grad():
        for block in unet.layers(SelfAttentionBlock):
            for linear in block.layers(fl.Linear):
                linear.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(6))
    inputs = conditioning(config, 2, 8, 8)
    text = torch.cat([inputs["text"][:1]] * 2 + [inputs["text"][1:]] * 2)  # halves: [neg, neg], [pos, pos]
    x = torch.cat([inputs["x"], inputs["x"]])  # the same two latents in both halves, as CFG gives them
    unet.set_timestep(torch.tensor(600.0))
    unet.set_clip_text_embedding(text)
    if "pooled" in inputs:
        unet.set_pooled_text_embedding(inputs["pooled"][[0, 0, 1, 1]])
        unet.set_time_ids(inputs["time_ids"][[0, 0, 1, 1]])
    with torch.no_grad():
        plain = unet(x)
        batch = StyleAligned(unet, uses_guidance=True)
        in_batch = unet(x)
        batch.eject()
        external = StyleAligned(unet, inputs["x"][:1], uses_guidance=True)
        external.reference_pass.noised_reference = lambda timestep, size: inputs["x"][:1].expand(
            size, -1, -1, -1
        )
        from_latent = unet(x)
        external.eject()
    assert (in_batch - plain).abs().max().item() > 1e-4  # measured 2.2e-4
    assert (from_latent - in_batch).abs().max().item() < 1e-5  # measured 2e-7; image 0: AdaIN to itself


def test_eject_restores_the_tree_contexts_and_weights_bit_for_bit(sd):
    before, contexts = repr(sd.unet), sorted(sd.unet.provider.contexts)
    weights = {name: tensor.clone() for name, tensor in sd.unet.state_dict().items()}
    plain = batch_run(sd, [], batch=2)
    batch_run(sd, [StyleAlignedPatch(scale=0.8, share_reference=True)], batch=2)
    reference = sd.encode_image(torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    batch_run(sd, [StyleAlignedPatch(reference)], batch=2)
    assert repr(sd.unet) == before and sorted(sd.unet.provider.contexts) == contexts
    after = sd.unet.state_dict()
    assert after.keys() == weights.keys() and all(torch.equal(after[k], weights[k]) for k in weights)
    assert all(torch.equal(a, b) for a, b in zip(batch_run(sd, [], batch=2), plain))


def test_every_self_attention_is_shared_and_a_wrong_reference_is_refused():
    unet = UNet(UNET_PRESETS["tiny"], device="meta")
    before = repr(unet)
    aligned = StyleAligned(unet)
    assert len(aligned.attentions) == len(self_attentions(unet)) == len(list(unet.layers(SelfAttentionBlock)))
    aligned.eject()
    assert repr(unet) == before
    with pytest.raises(ValueError, match=r"one \(1, 4, h, w\) reference latent"):
        StyleAligned(unet, torch.zeros(2, 4, 8, 8, device="meta"))
    inpainting = UNet(UNET_PRESETS["tiny"].with_changes(in_channels=9), device="meta")
    with pytest.raises(ValueError, match="inpainting UNets take no reference latent"):
        StyleAligned(inpainting, torch.zeros(1, 4, 8, 8, device="meta"))
    assert repr(unet) == before
    with pytest.raises(ValueError, match="scale must be >= 0"):
        StyleAlignedPatch(scale=-1.0)


def test_the_reference_latent_mode_reads_what_the_reference_pass_wrote():
    state = dict(STATE, uses_guidance=False)
    attention, root, adapter = one_layer(state)
    reference = torch.randn(1, 5, 8, generator=torch.Generator().manual_seed(4))
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():  # a reference of another size (7 tokens): the shared keys are just longer
        root.use_context("style")["mode"] = "write"
        root(torch.randn(1, 7, 8))
        root.use_context("style")["mode"] = READ
        assert root(x).shape == x.shape
    with torch.no_grad():
        root.use_context("style")["mode"] = "write"
        root(reference)
        root.use_context("style")["mode"] = READ
        ours = root(x)
        with_reference = hand_shared_attention(attention, torch.cat([reference, x]), 1, share_reference=True)
    assert (ours - with_reference[1:]).abs().max().item() < 1e-5
    with pytest.raises(Exception, match="reference pass did not run"):
        root(x)
    adapter.eject()
