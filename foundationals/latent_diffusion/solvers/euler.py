"""Euler (Karras et al., 2022, algorithm 2 without churn) and Euler ancestral, in the sigma parametrisation."""

import torch
from torch import Tensor

from .solver import (
    PredictionType,
    SigmaSchedule,
    Solver,
    TimestepSpacing,
    interpolate,
    karras_sigmas,
    sample_noise,
    sigmas_to_timesteps,
    spaced_timesteps,
    training_sigmas,
    upcast,
)


class Euler(Solver):
    """First-order ODE solver on x / alpha, as diffusers' `EulerDiscreteScheduler`.

    Its timesteps are float32 (fractional for linspace spacing and Karras sigmas), as in diffusers.
    """

    def build_schedule(self) -> None:
        """Float timesteps and their noise ratios `sigmas` (interpolated or Karras), plus a final 0."""
        train_sigmas = training_sigmas(self.alphas_cumprod)
        timesteps = spaced_timesteps(self.params, self.num_inference_steps, round_linspace=False).float()
        sigmas = interpolate(timesteps, train_sigmas)
        if self.params.sigma_schedule == SigmaSchedule.KARRAS:
            sigmas = karras_sigmas(sigmas[-1].item(), sigmas[0].item(), self.num_inference_steps)
            timesteps = sigmas_to_timesteps(sigmas, train_sigmas)
        self.timesteps = timesteps.float()
        self.sigmas = torch.cat([sigmas.float(), torch.zeros(1)])

    @property
    def init_noise_sigma(self) -> float:
        """The largest sigma (for leading spacing, the standard deviation of x / alpha there)."""
        max_sigma = self.sigmas.max()
        if self.params.timesteps_spacing == TimestepSpacing.LEADING:
            return float((max_sigma**2 + 1) ** 0.5)
        return float(max_sigma)

    def scale_model_input(self, x: Tensor, step: int) -> Tensor:
        """x / sqrt(sigma^2 + 1): back to the unit-variance input the model was trained on."""
        return x / ((self.sigmas[step] ** 2 + 1) ** 0.5)

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """Clean latents plus noise at the sigma of `step`."""
        return x + noise * self.sigmas[step].to(x.dtype)

    def denoise(self, x: Tensor, prediction: Tensor, sigma: Tensor) -> Tensor:
        """Predicted clean latents from the model output."""
        match self.params.prediction_type:
            case PredictionType.EPSILON:
                return x - sigma * prediction
            case PredictionType.V_PREDICTION:
                return prediction * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
            case _:
                raise ValueError(f"unknown prediction type {self.params.prediction_type!r}")

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """One Euler step of dx/dsigma = (x - denoised) / sigma down to the next sigma."""
        sigma = self.sigmas[step]
        x = upcast(x)
        derivative = (x - self.denoise(x, predicted_noise, sigma)) / sigma
        x = x + derivative * (self.sigmas[step + 1] - sigma)
        return x.to(predicted_noise.dtype)


class EulerAncestral(Euler):
    """Euler step down to sigma_down, then fresh noise up to the next sigma, as diffusers'
    `EulerAncestralDiscreteScheduler` (Karras sigmas use `EulerDiscreteScheduler`'s schedule)."""

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """One ancestral step: deterministic to sigma_down, then noise of scale sigma_up."""
        sigma, sigma_next = self.sigmas[step], self.sigmas[step + 1]
        x = upcast(x)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (x - self.denoise(x, predicted_noise, sigma)) / sigma
        x = x + derivative * (sigma_down - sigma)
        x = x + sample_noise(predicted_noise, generator) * sigma_up
        return x.to(predicted_noise.dtype)
