"""MultiDiffusion tiled sampling (`tiling.py`): diffusers' panorama pipeline, and the properties it guarantees.

Parity: diffusers' `StableDiffusionPanoramaPipeline` (DDIM, its `get_views` layout with a window of 8 latent
cells and a stride of 4 on a 16x24 latent: 15 views) on the tiny random weights; compared on the latents after 4
steps. diffusers averages each view's next latents, we average the views' predictions and take one DDIM step:
the same in exact arithmetic. In float32 the difference is the UNet kernels' rounding (measured 3.4e-5 to 4.8e-5
on latents up to ~15, ~3e-6 relative, as much as the plain untiled run at this size differs from diffusers'
txt2img pipeline: 5.3e-5); in float64 the two agree to 1.2e-13 (checks `multidiffusion`, `multidiffusion_float64`).

Properties: one tile covering the whole latent is the plain run (with conditioning masks and a ControlNet: the
cropping machinery runs and changes nothing); a model acting on each latent cell alone gives the same prediction
tiled or not, for every layout and blend, also with conditioning areas and masks cropped per tile; a ControlNet
hint covering the whole latent is cropped to each tile.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPanoramaPipeline

from foundationals.latent_diffusion.adapters.controlnet import ControlNetBranch, ControlNetPatch
from foundationals.latent_diffusion.conditioning import CombinedConditioning, Conditioning, ConditioningEntry
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.resizing import resize_hint
from foundationals.latent_diffusion.sampling import SizeConditioning, denoise
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.tiling import TiledPrediction, TileLayout, tile_starts, tile_weight
from tests.support.parity import assert_parity
from tests.support.tiny_control import diffusers_controlnet, ours_from_diffusers_controlnet
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
)
LATENT_HEIGHT, LATENT_WIDTH, WINDOW, STRIDE = 16, 24, 8, 4  # the tiny autoencoder downscales 4x


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer), ours_from_diffusers(
        unet, vae, text
    )


def panorama_and_ours(dtype: torch.dtype, parts=None):
    """diffusers' panorama pipeline and our tiled sampling on the same tiny weights in `dtype`: (ours, theirs).

    Both get the same prompt embeddings (our encoder's, equal to diffusers' `encode_prompt`: check
    `prompt_encoding`) and the same initial noise, so only the tiled denoise is compared."""
    if parts is None:
        unet, vae, text = (
            diffusers_unet().to(dtype),
            diffusers_autoencoder().to(dtype),
            transformers_text_encoder(),
        )
        sd = ours_from_diffusers(unet, vae, text)  # shares these tensors (loaded with assign)
    else:
        (unet, vae), sd = (parts[0]["unet"], parts[0]["vae"]), parts[1]
    reference = StableDiffusionPanoramaPipeline(
        unet=unet,
        vae=vae,
        text_encoder=None,  # embeddings given: the UNet's dtype is the embeddings' dtype
        tokenizer=None,
        scheduler=DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    # diffusers' own layout, for the tiny model's latent: its get_views divides pixels by 8 and uses a
    # 64-cell window by default; the window and stride are its arguments.
    views = StableDiffusionPanoramaPipeline.get_views(
        reference, LATENT_HEIGHT * 8, LATENT_WIDTH * 8, window_size=WINDOW, stride=STRIDE
    )
    reference.get_views = lambda height, width, circular_padding=False: views
    layout = TileLayout(WINDOW, WINDOW, STRIDE, STRIDE)
    ours_views = [
        (top, top + h, left, left + w) for h, w, top, left in layout.windows(LATENT_HEIGHT, LATENT_WIDTH)
    ]
    assert ours_views == views and len(views) == 15
    factor, steps, seed, scale = 4, 4, 7, 6.0
    positive, negative = sd.encode_prompts(
        "a wide mountain landscape",
        "blurry",
        SizeConditioning.for_image(LATENT_HEIGHT * factor, LATENT_WIDTH * factor),
    )
    positive, negative = (Conditioning(c.text_embedding.to(dtype)) for c in (positive, negative))  # type: ignore[union-attr]
    noise = torch.randn(
        (1, 4, LATENT_HEIGHT, LATENT_WIDTH),
        generator=torch.Generator().manual_seed(seed),
        dtype=torch.float32,
    ).to(dtype)
    expected = reference(
        prompt_embeds=positive.text_embedding,
        negative_prompt_embeds=negative.text_embedding,
        latents=noise.clone(),
        height=LATENT_HEIGHT * factor,
        width=LATENT_WIDTH * factor,
        num_inference_steps=steps,
        guidance_scale=scale,
        output_type="latent",
    ).images
    latents = sd.sample(
        (1, 4, LATENT_HEIGHT, LATENT_WIDTH),
        positive,
        negative,
        sd.make_solver("ddim", steps),
        scale,
        seed,
        noise=noise.clone(),
        tiling=layout,
    )
    return latents, expected


def test_tiled_denoise_equals_diffusers_panorama(parts):
    # float32: the rounding of the two UNets' kernels on latents up to ~15 (the plain, untiled DDIM run on the
    # same 16x24 latent already differs from diffusers' StableDiffusionPipeline by 5.3e-5, 3.3e-6 relative).
    latents, expected = panorama_and_ours(torch.float32, parts)
    assert expected.abs().max() > 1.0  # the comparison is on real values, not a collapsed latent
    assert_parity("multidiffusion", latents, expected)


def test_tiled_denoise_equals_diffusers_panorama_in_float64():
    # float64: the two ways (averaging next latents per view / averaging predictions, one DDIM step) agree to
    # float64 rounding: the float32 difference above is the kernels' rounding, not the algorithm.
    latents, expected = panorama_and_ours(torch.float64)
    assert latents.dtype == expected.dtype == torch.float64
    assert_parity("multidiffusion_float64", latents, expected)


def plain_and_tiled(sd, patches, layout, positive, negative, height=8, width=12, steps=3):
    results = []
    for tiling in (None, layout):
        run = SamplingRun(steps, 0, height, width, 1, uses_guidance=True)
        with patched(sd, patches, run):
            results.append(
                sd.sample(
                    (1, 4, height, width),
                    positive,
                    negative,
                    make_solver("dpmpp_2m", steps, "karras"),
                    5.0,
                    3,
                    run=run,
                    tiling=tiling,
                )
            )
    return results


@pytest.mark.parametrize("blend", ["uniform", "gaussian"])
def test_one_tile_covering_the_latent_is_the_plain_run(parts, blend):
    sd = parts[1]
    controlnet = ours_from_diffusers_controlnet(diffusers_controlnet(seed=1))
    hint = torch.rand(1, 32, 48, 3, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(8, 12)
    mask[:, 6:] = 1.0
    positive = [
        ConditioningEntry(sd.encode_prompt("a lake")),
        ConditioningEntry(sd.encode_prompt("a red barn"), mask=mask, strength=0.8),
    ]
    negative = [ConditioningEntry(sd.encode_prompt("blurry"))]
    plain, tiled = plain_and_tiled(
        sd, [ControlNetPatch(controlnet, hint, 0.9)], TileLayout(8, 12, 8, 12, blend), positive, negative
    )
    # exact: uniform divides by a count of 1, gaussian weighs by w / w = 1 (normalised in float64)
    assert torch.equal(plain, tiled)


class CellwiseUNet:
    """A stand-in denoiser acting on each latent cell alone (its output depends on the text and timestep)."""

    def __init__(self) -> None:
        self.text = torch.zeros(1)
        self.timestep = torch.zeros(1)

    def set_timestep(self, timestep):
        self.timestep = timestep

    def set_clip_text_embedding(self, text):
        self.text = text

    def __call__(self, x):
        weight = self.text.mean(dim=(1, 2)).reshape(-1, 1, 1, 1)
        return torch.tanh(x * weight + self.timestep.float() / 1000)


@pytest.mark.parametrize(
    "layout",
    [TileLayout(4, 4, 2, 2), TileLayout(6, 8, 3, 5, "gaussian"), TileLayout(8, 5, 8, 4)],
)
def test_a_cellwise_model_gives_the_same_prediction_tiled_or_not(layout):
    generator = torch.Generator().manual_seed(0)
    texts = [Conditioning(torch.randn(1, 3, 8, generator=generator)) for _ in range(3)]
    mask = torch.rand(10, 14, generator=generator)
    positive = [
        ConditioningEntry(texts[0]),
        ConditioningEntry(texts[1], mask=mask, mask_strength=0.7),
        ConditioningEntry(
            texts[2], area=(5, 7, 3, 4), strength=1.5
        ),  # feathered inner edges, cropped per tile
    ]
    negative = [ConditioningEntry(texts[2], area=(4, 6, 0, 0)), ConditioningEntry(texts[0])]
    latents = torch.randn(2, 4, 10, 14, generator=generator)
    results = []
    for tiles in (None, TiledPrediction(layout, 10, 14)):
        solver = make_solver("euler", 3)
        results.append(
            denoise(
                CellwiseUNet(),
                solver,
                latents * solver.init_noise_sigma,
                positive,
                negative,
                4.0,
                tiles=tiles,
            )
        )
    assert len(layout.windows(10, 14)) > 1
    assert (results[0] - results[1]).abs().max().item() <= 1e-5  # measured ~1e-6 (sums in another order)


def test_tile_layout_covers_the_latent_and_matches_diffusers_when_strides_fit():
    assert tile_starts(24, 8, 4) == [0, 4, 8, 12, 16]
    assert tile_starts(26, 8, 4) == [0, 4, 8, 12, 16, 18]  # one more against the edge
    assert tile_starts(6, 8, 4) == [0]
    layout = TileLayout.from_pixels(256, 192, 64, 8)
    assert (layout.tile_height, layout.tile_width, layout.stride_height, layout.stride_width) == (
        24,
        32,
        16,
        24,
    )
    for height, width in ((40, 64), (33, 70), (10, 10)):
        covered = torch.zeros(height, width)
        for h, w, top, left in layout.windows(height, width):
            assert top + h <= height and left + w <= width
            covered[top : top + h, left : left + w] += 1
        assert covered.min() >= 1
    weight = tile_weight(8, 6, "gaussian")
    assert weight.min() > 0 and weight[4, 3] > weight[0, 0]
    for bad in (dict(tile_height=0), dict(stride_width=9)):
        with pytest.raises(ValueError, match="tiling"):
            TileLayout(**{**dict(tile_height=8, tile_width=8, stride_height=4, stride_width=4), **bad})
    with pytest.raises(ValueError, match="overlap"):
        TileLayout.from_pixels(64, 64, 64, 8)


def test_a_controlnet_hint_over_the_whole_latent_is_cropped_to_each_tile():
    controlnet = ours_from_diffusers_controlnet(diffusers_controlnet(seed=1))
    hint = torch.rand(1, 40, 56, 3, generator=torch.Generator().manual_seed(5))
    branch = ControlNetBranch(controlnet, hint)
    whole = resize_hint(hint, 40, 56)
    for window in ((6, 8, 0, 0), (6, 8, 4, 6), (10, 14, 0, 0)):
        branch.window = (window, (10, 14))
        height, width, top, left = window
        tile = torch.zeros(2, 4, height, width)
        got = branch._batched(hint, tile, 2, torch.device("cpu"), torch.float32)
        expected = whole[..., top * 4 : (top + height) * 4, left * 4 : (left + width) * 4]
        assert torch.equal(got, torch.cat([expected, expected]))  # the same values, only cropped


def test_tiled_sampling_refuses_masked_adapters(parts):
    from foundationals.latent_diffusion.adapters.regional import Region

    sd = parts[1]
    run = SamplingRun(2, 0, 8, 8, 1, uses_guidance=False)
    run.regions.append(Region("r", torch.ones(1, 1, 8, 8)))
    with pytest.raises(ValueError, match="tiled sampling cannot be combined with masked adapters"):
        sd.sample(
            (1, 4, 8, 8),
            sd.encode_prompt("x"),
            None,
            make_solver("euler", 2),
            1.0,
            0,
            run=run,
            tiling=TileLayout(4, 4, 2, 2),
        )


def test_tiled_combined_conditioning_keeps_a_tile_without_entries_at_zero_image():
    # an area far from a tile: the tile's crop of the conditioning has no entry on that side
    text = Conditioning(torch.ones(1, 2, 8))
    combined = CombinedConditioning(
        [ConditioningEntry(text, area=(4, 4, 0, 0))], None, 8, 16, make_solver("euler", 2).alphas_cumprod
    )
    tiles = TiledPrediction(TileLayout(8, 8, 8, 8), 8, 16)
    far = tiles.conditioning(combined, (8, 8, 0, 8))
    assert far.positive == []
    near = tiles.conditioning(combined, (8, 8, 0, 0))
    assert [entry.area for entry in near.positive] == [(4, 4, 0, 0)]
