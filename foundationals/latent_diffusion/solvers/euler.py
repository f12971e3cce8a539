"""Euler (Karras et al., 2022, algorithm 2 without churn) and Euler ancestral, in the sigma parametrisation."""

import torch
from torch import Tensor

from .sigma_solver import SigmaSolver
from .solver import Evaluate, sample_noise, upcast


class Euler(SigmaSolver):
    """First-order ODE solver on x / alpha, as diffusers' `EulerDiscreteScheduler`.

    Its timesteps are float32 (fractional for linspace spacing and Karras sigmas), as in diffusers.
    """

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
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
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
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
