"""DeepCache: exact with cache_interval=1, cached steps really skip the deep blocks, exact inject/eject, per-run state.

Tiny SD1.5 (random weights), txt2img with CFG through the sampling path the sampler node uses. With interval 1
every pass is a full pass through the same layers as without the patch (same path, same inputs): the images are
equal (tolerance 0). With the default interval 3 the deviation from the exact image is reported (not a parity
figure: DeepCache is an approximation), and the deep blocks run only in the full steps.
"""

from __future__ import annotations

import pytest
import torch

from foundationals.latent_diffusion.adapters.deep_cache import DeepCachePatch, max_depth
from foundationals.latent_diffusion.adapters.guidance import FreeUPatch
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.unet import DownBlocks, MiddleBlock, UpBlocks
from tests.support.guided import guided_text_to_image
from tests.support.tiny_sd import (
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

STEPS = 6


@pytest.fixture(scope="module")
def sd():
    return ours_from_diffusers(diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder())


def run(sd, patches, steps: int = STEPS) -> torch.Tensor:
    return guided_text_to_image(sd, patches, "a red fox", "blurry", steps=steps, guidance_scale=6.0, seed=3)


class BlockCalls:
    """Counts the forward calls of the middle block and of the first / last input and output blocks."""

    def __init__(self, sd) -> None:
        unet = sd.unet
        down, up = unet.ensure_find(DownBlocks), unet.ensure_find(UpBlocks)
        self.blocks = {
            "input 0": down[0],
            "input last": down[len(down) - 1],
            "middle": unet.ensure_find(MiddleBlock),
            "output 0": up[0],
            "output last": up[len(up) - 1],
        }
        self.counts = dict.fromkeys(self.blocks, 0)
        self.handles = [
            block.register_forward_hook(lambda *_, name=name: self._count(name))
            for name, block in self.blocks.items()
        ]

    def _count(self, name: str) -> None:
        self.counts[name] += 1

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = (a - b).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def test_interval_one_is_the_exact_run(sd):
    exact = run(sd, [])
    cached = run(sd, [DeepCachePatch(interval=1)])
    torch.testing.assert_close(cached, exact, rtol=0, atol=0)  # same layers, same inputs


def test_cached_steps_skip_the_deep_blocks_and_the_deviation_is_small(sd):
    exact = run(sd, [])
    counter = BlockCalls(sd)
    try:
        cached = run(sd, [DeepCachePatch(interval=3, depth=1)])
    finally:
        counter.close()
    full_steps = len(range(0, STEPS, 3))  # steps 0 and 3 run in full, the 4 others only the shallow branch
    assert counter.counts == {
        "input 0": STEPS,
        "input last": full_steps,
        "middle": full_steps,
        "output 0": full_steps,
        "output last": STEPS,
    }
    difference = (cached - exact).abs().max().item()
    quality = psnr(cached, exact)
    print(
        f"DeepCache interval 3 depth 1 vs exact (tiny SD, {STEPS} DDIM steps): max|Δ| {difference:.3g}, PSNR {quality:.1f} dB"
    )
    assert difference > 0  # it does approximate
    assert quality > 15.0  # measured ~30 dB on this tiny random model


def test_window_and_depth_change_which_steps_are_cached(sd):
    counter = BlockCalls(sd)
    try:
        run(sd, [DeepCachePatch(interval=2, depth=max_depth(sd.unet), start=0.5, end=1.0)])
    finally:
        counter.close()
    # steps 0-2 before the window run in full; in the window 3, 5 run in full, 4 is cached
    # the deepest branch skips only the last input block, the middle block and output block 0
    assert counter.counts == {"input 0": 6, "input last": 5, "middle": 5, "output 0": 5, "output last": 6}


def test_inject_eject_restores_the_tree_and_weights_exactly(sd):
    unet = sd.unet
    tree = repr(unet)
    state = {key: value.clone() for key, value in unet.state_dict().items()}
    parameters = [id(parameter) for parameter in unet.parameters()]
    run_ = SamplingRun(
        num_steps=4, first_step=0, latent_height=4, latent_width=4, batch_size=1, uses_guidance=True
    )
    with patched(sd, [FreeUPatch(), DeepCachePatch(interval=3, depth=2)], run_):
        assert "DeepCacheStore" in repr(unet)
        assert repr(unet) != tree
    assert repr(unet) == tree
    assert [id(parameter) for parameter in unet.parameters()] == parameters
    after = unet.state_dict()
    assert list(after) == list(state)
    assert all(torch.equal(after[key], value) for key, value in state.items())


def test_no_state_leaks_between_runs_or_branches(sd):
    patch = DeepCachePatch(interval=3)
    first = run(sd, [patch])
    again = run(sd, [patch])  # a fresh cache: the first step runs in full, as in the first run
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    other = guided_text_to_image(
        sd, [patch], "a blue bird", "blurry", steps=STEPS, guidance_scale=6.0, seed=5
    )
    alone = guided_text_to_image(
        sd, [DeepCachePatch(interval=3)], "a blue bird", "blurry", steps=STEPS, guidance_scale=6.0, seed=5
    )
    torch.testing.assert_close(other, alone, rtol=0, atol=0)


def test_bad_settings_are_refused(sd):
    with pytest.raises(ValueError, match="cache_interval"):
        DeepCachePatch(interval=0)
    with pytest.raises(ValueError, match="start_percent"):
        DeepCachePatch(start=0.8, end=0.2)
    run_ = SamplingRun(
        num_steps=4, first_step=0, latent_height=4, latent_width=4, batch_size=1, uses_guidance=True
    )
    tree = repr(sd.unet)
    with pytest.raises(ValueError, match="cache depth"):
        with patched(sd, [DeepCachePatch(depth=99)], run_):
            pass
    assert repr(sd.unet) == tree
