"""DDPM (Ho et al., 2020): ancestral sampling of the posterior q(x_{t-1} | x_t, x_0)."""

import torch
from torch import Tensor

from .solver import Evaluate, Solver, sample_noise, spaced_timesteps


class DDPM(Solver):
    """Denoising Diffusion Probabilistic Models, as diffusers' `DDPMScheduler` (variance "fixed_small")."""

    def build_schedule(self) -> None:
        """Evenly spaced integer timesteps."""
        self.timesteps = spaced_timesteps(self.params, self.num_inference_steps).long()

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        """Mean of the posterior at the next timestep plus its (fixed, small) variance times fresh noise."""
        timestep = int(self.timestep_values[step])
        alpha_bar = self.alphas_cumprod[timestep]
        if step + 1 < self.num_inference_steps:
            previous_alpha_bar = self.alphas_cumprod[int(self.timestep_values[step + 1])]
        else:
            previous_alpha_bar = torch.ones_like(alpha_bar)
        alpha = alpha_bar / previous_alpha_bar
        beta = 1 - alpha
        denoised, _ = self.alpha_denoise(x, predicted_noise, alpha_bar)
        denoised_coefficient = previous_alpha_bar**0.5 * beta / (1 - alpha_bar)
        x_coefficient = alpha**0.5 * (1 - previous_alpha_bar) / (1 - alpha_bar)
        x = denoised_coefficient * denoised + x_coefficient * x
        if timestep > 0:
            noise = sample_noise(predicted_noise, generator)
            variance = torch.clamp((1 - previous_alpha_bar) / (1 - alpha_bar) * beta, min=1e-20)
            x = x + variance**0.5 * noise
        return x
