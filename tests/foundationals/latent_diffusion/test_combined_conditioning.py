"""Several conditioning entries combined per step, against ComfyUI's formula written out by hand.

ComfyUI (comfy/samplers.py `calc_cond_batch`, `get_area_and_mult`, `create_cond_with_same_area_if_none`,
`resolve_areas_and_cond_masks_multidim`, model_sampling.py `percent_to_sigma`) works on denoised images
x0_i = x - sigma * eps_i (x = model input * sqrt(sigma^2 + 1)):

    x0 = (sum_i mult_i * x0_i) / (1e-37 + sum_i mult_i),   guided = x0_neg + cfg * (x0_pos - x0_neg)

The references below compute exactly that, in x0 space, with a fake model whose output depends on the text,
the timestep and the position inside the crop it is run on; the library works on the prediction directly.
"""

import math

import pytest
import torch

from foundationals.latent_diffusion.conditioning import (
    CombinedConditioning,
    Conditioning,
    ConditioningEntry,
    percent_to_sigma,
    training_log_sigmas,
    zero_image_prediction,
)
from foundationals.latent_diffusion.sampling import denoise
from foundationals.latent_diffusion.solvers import PredictionType, make_solver
from foundationals.latent_diffusion.solvers.solver import SolverParams, cumulative_alphas

ALPHAS = cumulative_alphas(SolverParams())
LOG_SIGMAS = training_log_sigmas(ALPHAS)
TOLERANCE = 2e-5  # float32 round trips through x0 at sigma ~ 2 (measured <= 4e-6)


class FakeUNet:
    """A 'model' whose output depends on its input, its text, its timestep and the position in its crop."""

    def __init__(self) -> None:
        self.text: torch.Tensor | None = None
        self.timestep = torch.zeros(1)
        self.calls: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def set_timestep(self, timestep: torch.Tensor) -> None:
        self.timestep = timestep

    def set_clip_text_embedding(self, text: torch.Tensor) -> None:
        self.text = text

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert self.text is not None and self.text.shape[0] == x.shape[0]
        self.calls.append((tuple(x.shape), self.text.clone()))
        return eps(x, self.text, float(self.timestep))


def eps(x: torch.Tensor, text: torch.Tensor, timestep: float) -> torch.Tensor:
    ramp = torch.linspace(-1, 1, x.shape[-1]).view(1, 1, 1, -1)
    column = torch.linspace(0, 0.5, x.shape[-2]).view(1, 1, -1, 1)
    return 0.3 * x[:, :4] + text.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.1 * ramp * column + timestep / 1e4


def text(value: float, batch: int = 1, length: int = 77) -> Conditioning:
    return Conditioning(torch.full((batch, length, 8), value))


def sigma_of(timestep: int) -> float:
    return float(((1 - ALPHAS[timestep]) / ALPHAS[timestep]) ** 0.5)


def feather(size: int, at_start: bool, at_end: bool) -> torch.Tensor:
    """ComfyUI's fuzz along one side of an area without a mask: min(8, size // 4) cells fade in."""
    ramp = min(8, size // 4)
    weights = torch.ones(size)
    for t in range(ramp):
        if at_start:
            weights[t] *= (t + 1) / ramp
        if at_end:
            weights[size - 1 - t] *= (t + 1) / ramp
    return weights


def comfy_side(x, sigma, timestep, items):
    """One side (positive or negative) as ComfyUI sums it: items are (text, area (h, w, y, x) or None, mult)."""
    scaled = x * (sigma**2 + 1) ** 0.5
    out = torch.zeros_like(x)
    count = torch.full_like(x, 1e-37)
    for conditioning, area, mult in items:
        h, w, top, left = area if area is not None else (x.shape[2], x.shape[3], 0, 0)
        crop = x[:, :, top : top + h, left : left + w]
        x0 = scaled[:, :, top : top + h, left : left + w] - sigma * eps(crop, conditioning, timestep)
        out[:, :, top : top + h, left : left + w] += x0 * mult
        count[:, :, top : top + h, left : left + w] += mult
    return out / count


def comfy_guided(x, timestep, positive, negative, cfg):
    """ComfyUI's guided prediction, turned back into noise: eps = (x * sqrt(sigma^2 + 1) - x0) / sigma."""
    sigma = sigma_of(timestep)
    x0 = comfy_side(x, sigma, timestep, positive)
    if negative is not None:
        negative_x0 = comfy_side(x, sigma, timestep, negative)
        x0 = negative_x0 + cfg * (x0 - negative_x0)
    return (x * (sigma**2 + 1) ** 0.5 - x0) / sigma


def predict(combined, x, timestep, cfg=5.0, guidance=True):
    unet = FakeUNet()
    unet.set_timestep(torch.tensor([float(timestep)]))
    result = combined.predict(
        unet,
        lambda c: unet.set_clip_text_embedding(c.text_embedding),
        x,
        torch.tensor(float(timestep)),
        cfg,
        guidance,
    )
    return result, unet


def test_an_area_prompt_is_feathered_averaged_and_mirrored_on_the_negative_side():
    torch.manual_seed(0)
    x = torch.randn(1, 4, 32, 32)
    base, region, negative = text(0.2), text(-0.7), text(0.05)
    combined = CombinedConditioning(
        [ConditioningEntry(base), ConditioningEntry(region, strength=0.5, area=(16, 16, 8, 8))],
        [ConditioningEntry(negative)],
        32,
        32,
        ALPHAS,
    )
    result, unet = predict(combined, x, 500)
    ramp = feather(16, True, True)
    mult = 0.5 * ramp[:, None] * ramp[None, :]
    area = (16, 16, 8, 8)
    positive = [(base.text_embedding, None, 1.0), (region.text_embedding, area, mult)]
    # the negative side gets the region's area (and strength, feathering) with its own text
    mirrored = [(negative.text_embedding, None, 1.0), (negative.text_embedding, area, mult)]
    reference = comfy_guided(x, 500, positive, mirrored, 5.0)
    assert (result - reference).abs().max() < TOLERANCE
    # one pass per crop, each [negative, positive] in one batch, as the plain path runs
    assert [shape for shape, _ in unet.calls] == [(2, 4, 32, 32), (2, 4, 16, 16)]
    assert torch.equal(unet.calls[1][1][0], negative.text_embedding[0])
    assert torch.equal(unet.calls[1][1][1], region.text_embedding[0])


def test_areas_touching_the_border_do_not_fade_there_and_are_clamped_to_the_latent():
    torch.manual_seed(1)
    x = torch.randn(2, 4, 24, 40)
    left, right = text(0.4), text(-0.3)
    entries = [ConditioningEntry(left, area=(24, 20, 0, 0)), ConditioningEntry(right, area=(30, 28, 0, 20))]
    combined = CombinedConditioning(entries, None, 24, 40, ALPHAS)
    result, unet = predict(combined, x, 300, guidance=False)
    left_mult = feather(20, False, True)[None, :].expand(24, 20)
    right_mult = feather(20, True, False)[None, :].expand(24, 20)  # 28 wide from 20: clamped to 20
    positive = [
        (left.text_embedding, (24, 20, 0, 0), left_mult),
        (right.text_embedding, (24, 20, 0, 20), right_mult),
    ]
    assert (result - comfy_guided(x, 300, positive, None, 1.0)).abs().max() < TOLERANCE
    assert [shape for shape, _ in unet.calls] == [(2, 4, 24, 20), (2, 4, 24, 20)]


def test_cells_no_entry_reaches_are_predicted_as_a_zero_image():
    torch.manual_seed(2)
    x = torch.randn(1, 4, 16, 16)
    combined = CombinedConditioning([ConditioningEntry(text(1.0), area=(8, 8, 0, 0))], None, 16, 16, ALPHAS)
    result, _ = predict(combined, x, 700, guidance=False)
    sigma = sigma_of(700)
    outside = (x * (sigma**2 + 1) ** 0.5 / sigma)[..., 8:, :]  # eps for x0 = 0
    assert (result[..., 8:, :] - outside).abs().max() < 1e-5
    assert (
        result
        - comfy_guided(
            x,
            700,
            [
                (
                    text(1.0).text_embedding,
                    (8, 8, 0, 0),
                    feather(8, False, True)[:, None] * feather(8, False, True)[None],
                )
            ],
            None,
            1.0,
        )
    ).abs().max() < TOLERANCE


def test_masks_weight_entries_and_mask_bounds_crop_to_their_bounding_box():
    torch.manual_seed(3)
    x = torch.randn(1, 4, 16, 16)
    pixels = torch.zeros(1, 128, 128)
    pixels[:, 16:80, 40:104] = 1.0
    pixels[:, 16:80, 40:56] = 0.5
    latent_mask = torch.nn.functional.interpolate(pixels[:, None], size=(16, 16), mode="bilinear")[:, 0]
    rows, columns = torch.where(latent_mask[0] != 0)
    top, left = int(rows.min()), int(columns.min())
    box = (max(8, int(rows.max()) - top + 1), max(8, int(columns.max()) - left + 1), top, left)
    base, masked, bounded = text(0.1), text(0.9), text(-0.5)
    entries = [
        ConditioningEntry(base, strength=0.8),
        ConditioningEntry(masked, mask=pixels, mask_strength=0.7, strength=1.5),
        ConditioningEntry(bounded, mask=pixels[0], area_from_mask=True, mask_strength=0.6),
    ]
    combined = CombinedConditioning(entries, None, 16, 16, ALPHAS)
    result, unet = predict(combined, x, 450, guidance=False)
    h, w, y, x0 = box
    mult_mask = (latent_mask * 0.7 * 1.5)[:, None].expand(1, 4, 16, 16)
    mult_box = (latent_mask[:, y : y + h, x0 : x0 + w] * 0.6)[:, None].expand(1, 4, h, w)  # no feathering
    positive = [
        (base.text_embedding, None, 0.8),
        (masked.text_embedding, None, mult_mask),
        (bounded.text_embedding, box, mult_box),
    ]
    assert (result - comfy_guided(x, 450, positive, None, 1.0)).abs().max() < TOLERANCE
    assert sorted(shape for shape, _ in unet.calls) == sorted([(1, 4, 16, 16), (1, 4, 16, 16), (1, 4, h, w)])


def test_an_empty_mask_with_bounds_runs_on_the_smallest_area_and_adds_nothing():
    torch.manual_seed(4)
    x = torch.randn(1, 4, 16, 16)
    entries = [
        ConditioningEntry(text(0.3)),
        ConditioningEntry(text(2.0), mask=torch.zeros(16, 16), area_from_mask=True),
    ]
    combined = CombinedConditioning(entries, None, 16, 16, ALPHAS)
    result, unet = predict(combined, x, 200, guidance=False)
    alone, _ = predict(
        CombinedConditioning([ConditioningEntry(text(0.3))], None, 16, 16, ALPHAS), x, 200, guidance=False
    )
    assert (result - alone).abs().max() < TOLERANCE
    assert (1, 4, 8, 8) in [shape for shape, _ in unet.calls]


def test_area_fractions_resolve_as_comfyui_rounds_them():
    combined = CombinedConditioning(
        [ConditioningEntry(text(0.0), area_fraction=(0.5, 0.33, 0.25, 0.5))], None, 20, 30, ALPHAS
    )
    assert combined.positive[0].area == (
        max(1, round(0.5 * 20)),
        max(1, round(0.33 * 30)),
        round(0.25 * 20),
        round(0.5 * 30),
    )


def test_noise_windows_follow_comfyui_percent_to_sigma():
    log_sigmas = LOG_SIGMAS
    for percent in (0.25, 0.5, 0.8):
        t = (1 - percent) * 999.0
        low, high, w = math.floor(t), math.ceil(t), t - math.floor(t)
        expected = math.exp((1 - w) * float(log_sigmas[low]) + w * float(log_sigmas[high]))
        assert percent_to_sigma(percent, log_sigmas) == pytest.approx(expected, rel=1e-6)
    assert percent_to_sigma(0.0, log_sigmas) == 999999999.9 and percent_to_sigma(1.0, log_sigmas) == 0.0
    early, late = text(0.5), text(-0.5)
    entries = [ConditioningEntry(early, end_percent=0.5), ConditioningEntry(late, start_percent=0.5)]
    combined = CombinedConditioning(entries, None, 8, 8, ALPHAS)
    x = torch.randn(1, 4, 8, 8)
    for timestep, active in ((999, early), (600, early), (400, late), (1, late)):
        result, unet = predict(combined, x, timestep, guidance=False)
        assert len(unet.calls) == 1 and torch.equal(unet.calls[0][1], active.text_embedding)
        assert (
            result - comfy_guided(x, timestep, [(active.text_embedding, None, 1.0)], None, 1.0)
        ).abs().max() < TOLERANCE


def test_uneven_sides_fill_the_missing_half_and_leave_its_output_out():
    torch.manual_seed(5)
    x = torch.randn(1, 4, 8, 8)
    a, b, n = text(0.1), text(0.6), text(-0.2, length=154)
    combined = CombinedConditioning(
        [ConditioningEntry(a), ConditioningEntry(b, strength=2.0)], [ConditioningEntry(n)], 8, 8, ALPHAS
    )
    result, unet = predict(combined, x, 800, cfg=3.0)
    reference = comfy_guided(
        x,
        800,
        [(a.text_embedding, None, 1.0), (b.text_embedding, None, 2.0)],
        [(n.text_embedding, None, 1.0)],
        3.0,
    )
    assert (result - reference).abs().max() < TOLERANCE
    assert [shape for shape, _ in unet.calls] == [(2, 4, 8, 8), (2, 4, 8, 8)]
    assert unet.calls[0][1].shape[1] == 154  # 154 and 77 tokens batched by repeating the shorter one
    assert torch.equal(unet.calls[1][1][0], unet.calls[1][1][1])  # the negative half filled with b, left out


def test_conditioning_batches_repeat_as_comfyui_repeat_to_batch_size():
    x = torch.randn(3, 4, 8, 8)
    two = Conditioning(torch.stack([torch.full((77, 8), 0.1), torch.full((77, 8), 0.9)]))
    combined = CombinedConditioning([ConditioningEntry(two, strength=0.5)], None, 8, 8, ALPHAS)
    _, unet = predict(combined, x, 100, guidance=False)
    used = unet.calls[0][1].mean(dim=(1, 2))
    assert torch.allclose(used, torch.tensor([0.1, 0.9, 0.1]))


def test_zero_image_predictions_denoise_to_zero_for_epsilon_and_v():
    x, sigma = torch.randn(1, 4, 4, 4), torch.tensor(3.0)
    scaled = x * (sigma**2 + 1) ** 0.5
    eps_zero = zero_image_prediction(x, sigma, PredictionType.EPSILON)
    assert torch.allclose(scaled - sigma * eps_zero, torch.zeros_like(x), atol=1e-5)
    v_zero = zero_image_prediction(x, sigma, PredictionType.V_PREDICTION)
    x0 = scaled / (sigma**2 + 1) - v_zero * sigma / (sigma**2 + 1) ** 0.5  # ComfyUI's V_PREDICTION denoised
    assert torch.allclose(x0, torch.zeros_like(x), atol=1e-5)


def test_denoise_with_entries_acting_everywhere_is_the_plain_path_and_two_equal_halves_average_to_it():
    torch.manual_seed(6)
    latents = torch.randn(1, 4, 8, 8)
    solver = make_solver("euler", 4, "linspace")
    plain = denoise(FakeUNet(), solver, latents * solver.init_noise_sigma, text(0.3), text(-0.1), 4.0)
    listed = denoise(
        FakeUNet(),
        solver,
        latents * solver.init_noise_sigma,
        [ConditioningEntry(text(0.3))],
        [ConditioningEntry(text(-0.1))],
        4.0,
    )
    assert torch.equal(plain, listed)  # a single entry acting everywhere takes the plain path
    halves = [ConditioningEntry(text(0.3), strength=0.5), ConditioningEntry(text(0.3), strength=0.5)]
    combined = denoise(
        FakeUNet(), solver, latents * solver.init_noise_sigma, halves, [ConditioningEntry(text(-0.1))], 4.0
    )
    assert (combined - plain).abs().max() < 1e-5
