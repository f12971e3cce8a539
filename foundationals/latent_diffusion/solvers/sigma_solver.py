"""The schedule shared by the solvers on x = x0 + sigma * noise (Euler, Heun, LMS, DPM++ SDE, DPM++ 2S a).

They work on latents divided by alpha (Karras et al., 2022), as diffusers' `EulerDiscreteScheduler` and its
siblings do: the model sees x / sqrt(sigma^2 + 1), the final sigma is 0. Their schedule follows those
schedulers: float timesteps (unrounded for linspace spacing), sigmas interpolated at them, or one of the
`SigmaSchedule`s with the timesteps interpolated back in log sigma.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .schedules import COMFYUI_SCHEDULES, beta_sigmas, comfyui_sigmas, exponential_sigmas
from .solver import (
    SigmaSchedule,
    Solver,
    TimestepSpacing,
    interpolate,
    karras_sigmas,
    sigma_denoise,
    sigmas_to_timesteps,
    spaced_timesteps,
    training_sigmas,
)


def spaced_sigma_schedule(solver: Solver, num_steps: int) -> tuple[Tensor, Tensor]:
    """(float timesteps, float64 sigmas without the final 0) as diffusers' EulerDiscrete-like schedulers build them.

    ComfyUI's schedules take their own sigmas; diffusers' conversions (Karras, exponential, beta) take the
    interpolated sigmas' end points. Timesteps of converted sigmas are interpolated back in log sigma.
    """
    params = solver.params
    train_sigmas = training_sigmas(solver.alphas_cumprod)
    schedule = params.sigma_schedule
    if schedule in COMFYUI_SCHEDULES:
        sigmas = comfyui_sigmas(schedule, train_sigmas, num_steps)[:-1]
        return sigmas_to_timesteps(sigmas, train_sigmas), sigmas
    timesteps = spaced_timesteps(params, num_steps, round_linspace=False).float()
    sigmas = interpolate(timesteps, train_sigmas)
    if schedule is None:
        return timesteps, sigmas
    sigma_min, sigma_max = sigmas[-1].item(), sigmas[0].item()
    match schedule:
        case SigmaSchedule.KARRAS:
            sigmas = karras_sigmas(sigma_min, sigma_max, num_steps)
        case SigmaSchedule.EXPONENTIAL:
            sigmas = exponential_sigmas(sigma_min, sigma_max, num_steps)
        case SigmaSchedule.BETA_SIGMAS:
            sigmas = beta_sigmas(sigma_min, sigma_max, num_steps)
        case _:
            raise ValueError(f"unknown sigma schedule {schedule!r}")
    return sigmas_to_timesteps(sigmas, train_sigmas), sigmas


class SigmaSolver(Solver):
    """A solver on x = x0 + sigma * noise: `sigmas` (with a final 0) beside float32 `timesteps`.

    `sigma_values` holds the same sigmas as Python floats, for step coefficients computed without touching
    the device (no host synchronisation in the sampling loop).
    """

    clamp_terminal_alpha = True
    sigmas: Tensor
    sigma_values: list[float]

    def build_schedule(self) -> None:
        """Timesteps and sigmas for `num_inference_steps` (see `spaced_sigma_schedule`)."""
        timesteps, sigmas = spaced_sigma_schedule(self, self.num_inference_steps)
        self.set_sigma_schedule(timesteps, sigmas)

    def set_sigma_schedule(self, timesteps: Tensor, sigmas: Tensor) -> None:
        """Adopt float32 timesteps and sigmas plus a final 0 (a schedule may have fewer steps than asked)."""
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sigmas.float(), torch.zeros(1)])
        self.sigma_values = [float(sigma) for sigma in self.sigmas]
        self.adopt_step_count(len(self.timesteps))

    @property
    def init_noise_sigma(self) -> float:
        """The largest sigma (for leading spacing, the standard deviation of x / alpha there)."""
        max_sigma = max(self.sigma_values)
        if self.params.timesteps_spacing == TimestepSpacing.LEADING:
            return float((max_sigma**2 + 1) ** 0.5)
        return float(max_sigma)

    def scale_model_input(self, x: Tensor, step: int) -> Tensor:
        """x / sqrt(sigma^2 + 1): back to the unit-variance input the model was trained on."""
        return x / ((self.sigmas[step] ** 2 + 1) ** 0.5)

    def scale_input_at(self, x: Tensor, sigma: float) -> Tensor:
        """The model input for latents `x` at noise level `sigma` (for a solver's extra evaluations)."""
        return x * (1.0 / (sigma**2 + 1) ** 0.5)

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """Clean latents plus noise at the sigma of `step`."""
        return x + noise * self.sigmas[step].to(x.dtype)

    def denoise(self, x: Tensor, prediction: Tensor, sigma: float | Tensor) -> Tensor:
        """Predicted clean latents from the model output at noise level `sigma`."""
        return sigma_denoise(x, prediction, sigma, self.params.prediction_type)


__all__ = ["SigmaSolver", "spaced_sigma_schedule"]
