"""Noise-level schedules for sigma-based solvers: diffusers' sigma conversions and ComfyUI's schedulers.

Every function returns descending noise ratios sigma = sqrt((1 - alpha_bar) / alpha_bar) as float64 (the
solvers cast them as diffusers does). ComfyUI's schedulers (`simple`, `sgm_uniform`, `beta`, Align Your Steps)
end with the 0 ComfyUI appends; diffusers' conversions (Karras, exponential, beta sigmas) do not.

The Beta distribution's quantile function is computed here (regularized incomplete beta by its continued
fraction, inverted by safeguarded Newton steps), so the schedules need no scipy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .solver import SigmaSchedule, karras_sigmas

AYS_NOISE_LEVELS: dict[SigmaSchedule, tuple[float, ...]] = {
    SigmaSchedule.AYS_SD15: (
        14.6146412293,
        6.4745760956,
        3.8636745985,
        2.6946151520,
        1.8841921177,
        1.3943805092,
        0.9642583904,
        0.6523686016,
        0.3977456272,
        0.1515232662,
        0.0291671582,
    ),
    SigmaSchedule.AYS_SDXL: (
        14.6146412293,
        6.3184485287,
        3.7681790315,
        2.1811480769,
        1.3405244945,
        0.8620721141,
        0.5550693289,
        0.3798540708,
        0.2332364134,
        0.1114188177,
        0.0291671582,
    ),
}
"""Align Your Steps (Sabour et al., 2024) 10-step noise levels for SD1.5 and SDXL, as NVIDIA publishes them
(research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html); other step counts interpolate log-linearly."""

COMFYUI_SCHEDULES = (
    SigmaSchedule.BETA,
    SigmaSchedule.SIMPLE,
    SigmaSchedule.SGM_UNIFORM,
    SigmaSchedule.AYS_SD15,
    SigmaSchedule.AYS_SDXL,
)
"""The schedules defined on the model's training sigmas as ComfyUI defines them (they end with sigma 0)."""


def exponential_sigmas(sigma_min: float, sigma_max: float, num_steps: int) -> Tensor:
    """Noise levels evenly spaced in log sigma, descending (diffusers' `use_exponential_sigmas`)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), num_steps, dtype=torch.float64).exp()


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """diffusers' `use_beta_sigmas`: sigma_min + Beta(alpha, beta) quantiles of 1 .. 0 times the sigma range."""
    quantiles = 1 - torch.linspace(0, 1, num_steps, dtype=torch.float64)
    levels = [sigma_min + beta_quantile(float(q), alpha, beta) * (sigma_max - sigma_min) for q in quantiles]
    return torch.tensor(levels, dtype=torch.float64)


def comfyui_sigmas(schedule: SigmaSchedule, train_sigmas: Tensor, num_steps: int) -> Tensor:
    """One of ComfyUI's schedulers on the training sigmas (ascending, one per training timestep), ending in 0."""
    match schedule:
        case SigmaSchedule.SIMPLE:
            levels = simple_sigmas(train_sigmas, num_steps)
        case SigmaSchedule.SGM_UNIFORM:
            levels = sgm_uniform_sigmas(train_sigmas, num_steps)
        case SigmaSchedule.BETA:
            levels = timestep_beta_sigmas(train_sigmas, num_steps)
        case SigmaSchedule.AYS_SD15 | SigmaSchedule.AYS_SDXL:
            levels = align_your_steps_sigmas(AYS_NOISE_LEVELS[schedule], num_steps)
        case _:
            raise ValueError(
                f"{schedule!r} is not one of ComfyUI's schedules ({', '.join(COMFYUI_SCHEDULES)})"
            )
    return levels


def simple_sigmas(train_sigmas: Tensor, num_steps: int) -> Tensor:
    """ComfyUI's `simple`: every (T / n)-th training sigma from the largest down, then 0."""
    stride = len(train_sigmas) / num_steps
    picked = [float(train_sigmas[-(1 + int(index * stride))]) for index in range(num_steps)]
    return torch.tensor([*picked, 0.0], dtype=torch.float64)


def sgm_uniform_sigmas(train_sigmas: Tensor, num_steps: int) -> Tensor:
    """ComfyUI's `sgm_uniform`: n timesteps evenly spaced from the last training one (the n+1-th, 0, dropped),
    their sigmas interpolated linearly in log sigma, then 0."""
    last = len(train_sigmas) - 1
    timesteps = torch.linspace(last, 0, num_steps + 1, dtype=torch.float32)[:-1]
    log_sigmas = train_sigmas.to(torch.float32).log()
    low = timesteps.floor().long()
    high = timesteps.ceil().long()
    weight = timesteps.frac()
    levels = ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()
    return torch.cat([levels.to(torch.float64), torch.zeros(1, dtype=torch.float64)])


def timestep_beta_sigmas(
    train_sigmas: Tensor, num_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """ComfyUI's `beta` (Lee et al., 2024, "Beta Sampling is All You Need"): timesteps at the Beta(alpha, beta)
    quantiles of 1 .. 1/n, rounded to training timesteps; repeats of a timestep are dropped (so very long
    schedules may have fewer steps), then 0."""
    last = len(train_sigmas) - 1
    picked: list[float] = []
    previous = -1
    for index in range(num_steps):
        timestep = round_half_even(beta_quantile(1 - index / num_steps, alpha, beta) * last)
        if timestep != previous:
            picked.append(float(train_sigmas[timestep]))
        previous = timestep
    return torch.tensor([*picked, 0.0], dtype=torch.float64)


def align_your_steps_sigmas(table: tuple[float, ...], num_steps: int) -> Tensor:
    """Align Your Steps: the table (interpolated log-linearly to n + 1 levels when n differs), its last level 0."""
    levels = torch.tensor(table, dtype=torch.float64)
    if num_steps + 1 != len(levels):
        ascending_logs = levels.flip(0).log()
        positions = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64) * (len(levels) - 1)
        low = positions.floor().long().clamp(max=len(levels) - 2)
        weight = positions - low
        logs = ascending_logs[low] + weight * (ascending_logs[low + 1] - ascending_logs[low])
        levels = logs.exp().flip(0)
    levels = levels.clone()
    levels[-1] = 0.0
    return levels


def round_half_even(value: float) -> int:
    """Round to the nearest integer, halves to even (numpy's `rint`)."""
    return int(round(value))


# -- The Beta distribution's quantile function --------------------------------------------------------------


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _incomplete_beta_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (modified Lentz), converging fast for x < (a + 1) / (a + b + 2)."""
    tiny, epsilon = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        # even term: m (b - m) x / ((a + 2m - 1)(a + 2m)); odd term: -(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1))
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < epsilon:
            break
    return fraction


def regularized_incomplete_beta(x: float, a: float, b: float) -> float:
    """I_x(a, b), the Beta(a, b) distribution function at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - regularized_incomplete_beta(1.0 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b)) / a
    return front * _incomplete_beta_fraction(x, a, b)


def beta_quantile(q: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = q: Newton steps on the distribution function, kept inside a bisection bracket."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    low, high = 0.0, 1.0
    x = 0.5
    log_norm = _log_beta(a, b)
    for _ in range(200):
        error = regularized_incomplete_beta(x, a, b) - q
        if error > 0:
            high = x
        else:
            low = x
        density = math.exp((a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - log_norm)
        step = error / density if density > 0 else 0.0
        candidate = x - step
        if not low < candidate < high:
            candidate = 0.5 * (low + high)
        if abs(candidate - x) <= 1e-15 * max(x, 1e-300) or high - low <= 1e-16:
            return candidate
        x = candidate
    return x


__all__ = [
    "AYS_NOISE_LEVELS",
    "COMFYUI_SCHEDULES",
    "align_your_steps_sigmas",
    "beta_quantile",
    "beta_sigmas",
    "comfyui_sigmas",
    "exponential_sigmas",
    "karras_sigmas",
    "regularized_incomplete_beta",
    "sgm_uniform_sigmas",
    "simple_sigmas",
    "timestep_beta_sigmas",
]
