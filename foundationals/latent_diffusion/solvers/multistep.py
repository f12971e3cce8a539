"""The schedule shared by the multistep exponential integrators on variance-preserving latents (DPM-Solver++,
UniPC, DEIS): x = alpha * x0 + sigma_vp * noise, as diffusers' `DPMSolverMultistepScheduler` and its siblings.

Their schedule follows those schedulers: integer timesteps (num_inference_steps + 1 spaced points, the last
dropped), or a `SigmaSchedule` with the timesteps interpolated back in log sigma (rounded for Karras and
ComfyUI's schedules, truncated for exponential and beta sigmas, as diffusers casts them), then a final sigma
of 0. The noise ratios sigma (of x / alpha) are kept as a tensor and as Python floats (`sigma_values`): step
coefficients are computed from the floats, so a step never reads a value back from the device.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .schedules import COMFYUI_SCHEDULES, beta_sigmas, comfyui_sigmas, exponential_sigmas
from .solver import (
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
    karras_sigmas,
    sigmas_to_timesteps,
    training_sigmas,
)


def dpm_timesteps(params: SolverParams, num_inference_steps: int) -> Tensor:
    """DPM-Solver's own spacings: num_inference_steps + 1 points with the last one dropped (float64)."""
    n_train, n = params.num_train_timesteps, num_inference_steps
    match params.timesteps_spacing:
        case TimestepSpacing.LINSPACE:
            return torch.linspace(0, n_train - 1, n + 1, dtype=torch.float64).round().flip(0)[:-1]
        case TimestepSpacing.LEADING:
            steps = torch.arange(n + 1, dtype=torch.float64) * (n_train // (n + 1))
            return steps.flip(0)[:-1] + params.timesteps_offset
        case TimestepSpacing.TRAILING:
            return torch.arange(n_train, 0, -n_train / n, dtype=torch.float64).round() - 1
        case _:
            raise ValueError(f"unknown timestep spacing {params.timesteps_spacing!r}")


def multistep_schedule(solver: Solver, num_steps: int) -> tuple[Tensor, Tensor]:
    """(timesteps, float64 sigmas without the final one) as diffusers' multistep schedulers build them."""
    params = solver.params
    train_sigmas = training_sigmas(solver.alphas_cumprod)
    schedule = params.sigma_schedule
    if schedule is None:
        timesteps = dpm_timesteps(params, num_steps)
        return timesteps, train_sigmas[timesteps.long()].to(torch.float64)
    if schedule in COMFYUI_SCHEDULES:
        sigmas = comfyui_sigmas(schedule, train_sigmas, num_steps)[:-1]
        return sigmas_to_timesteps(sigmas, train_sigmas).round(), sigmas
    sigma_min, sigma_max = train_sigmas[0].item(), train_sigmas[-1].item()
    match schedule:
        case SigmaSchedule.KARRAS:
            sigmas = karras_sigmas(sigma_min, sigma_max, num_steps)
            return sigmas_to_timesteps(sigmas, train_sigmas).round(), sigmas
        case SigmaSchedule.EXPONENTIAL:
            sigmas = exponential_sigmas(sigma_min, sigma_max, num_steps)
        case SigmaSchedule.BETA_SIGMAS:
            sigmas = beta_sigmas(sigma_min, sigma_max, num_steps)
        case _:
            raise ValueError(f"unknown sigma schedule {schedule!r}")
    return sigmas_to_timesteps(sigmas, train_sigmas), sigmas


def vp_scales(sigma: float) -> tuple[float, float]:
    """(alpha, sigma_vp) of the variance-preserving latents at noise ratio `sigma`."""
    alpha = 1.0 / math.sqrt(sigma * sigma + 1.0)
    return alpha, sigma * alpha


def half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma_vp) = -log(sigma); +inf at sigma 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


class MultistepSolver(Solver):
    """A solver on variance-preserving latents with integer `timesteps` and `sigmas` (plus a final sigma).

    `final_sigma` is what follows the last step's sigma: "zero" (DPM-Solver++, UniPC) or "sigma_min" (DEIS:
    the smallest training sigma after spaced timesteps, the last sigma repeated after converted ones; ComfyUI's
    schedules always end at 0). `history` keeps (step, value) of this run's last steps for multistep updates.
    """

    clamp_terminal_alpha = True
    final_sigma: str = "zero"
    sigmas: Tensor
    sigma_values: list[float]

    def build_schedule(self) -> None:
        """Timesteps and sigmas for `num_inference_steps` (see `multistep_schedule`), and an empty history."""
        timesteps, sigmas = multistep_schedule(self, self.num_inference_steps)
        self.timesteps = timesteps.long()
        last = torch.zeros(1)
        schedule = self.params.sigma_schedule
        if self.final_sigma == "sigma_min" and schedule not in COMFYUI_SCHEDULES:
            if schedule is None:
                last = training_sigmas(self.alphas_cumprod)[:1]
            else:
                last = sigmas[-1:].float()
        elif self.final_sigma not in ("zero", "sigma_min"):
            raise ValueError(f"unknown final sigma {self.final_sigma!r}")
        self.sigmas = torch.cat([sigmas.float(), last.float()])
        self.sigma_values = [float(sigma) for sigma in self.sigmas]
        self.history: list[tuple[int, object]] = []
        self.adopt_step_count(len(self.timesteps))

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """Clean latents noised to the level of `step`."""
        alpha, sigma = vp_scales(self.sigma_values[step])
        return alpha * x + sigma * noise

    def data_prediction(self, x: Tensor, prediction: Tensor, step: int) -> Tensor:
        """The predicted clean latents x0 at `step`, from the model output."""
        alpha, sigma = vp_scales(self.sigma_values[step])
        match self.params.prediction_type:
            case PredictionType.EPSILON:
                return (x - sigma * prediction) / alpha
            case PredictionType.V_PREDICTION:
                return alpha * x - sigma * prediction
            case PredictionType.SAMPLE:
                return prediction
            case _:
                raise ValueError(f"unknown prediction type {self.params.prediction_type!r}")

    def recent(self, step: int) -> list[object]:
        """The values recorded at step - 1, step - 2, ... in this run (stops at a gap or the first step)."""
        found: list[object] = []
        for offset, (index, value) in enumerate(reversed(self.history)):
            if index != step - 1 - offset or index < self.first_inference_step:
                break
            found.append(value)
        return found

    def record(self, step: int, value: object, keep: int) -> None:
        """Remember `value` for `step`, keeping the last `keep` entries."""
        self.history = [*self.history, (step, value)][-keep:]


__all__ = ["MultistepSolver", "dpm_timesteps", "half_log_snr", "multistep_schedule", "vp_scales"]
