"""LCM (Luo et al., 2023): latent consistency models' multistep sampler."""

import torch
from torch import Tensor

from .solver import Evaluate, Solver, SolverParams, sample_noise


class LCM(Solver):
    """Consistency-model sampling, as diffusers' `LCMScheduler` (its timesteps ignore the spacing).

    `strength` < 1 picks all steps among the lower-noise distillation timesteps, as diffusers' LCM img2img
    pipeline does (`set_timesteps(..., strength=...)`); run it from step 0 after `add_noise(x, noise, 0)`.
    """

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        original_inference_steps: int = 50,
        timestep_scaling: float = 10.0,
        strength: float = 1.0,
    ) -> None:
        self.original_inference_steps = original_inference_steps
        self.timestep_scaling = timestep_scaling
        self.strength = strength
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        """The distillation schedule's step count, the boundary-condition time scaling and the strength."""
        return {
            "original_inference_steps": self.original_inference_steps,
            "timestep_scaling": self.timestep_scaling,
            "strength": self.strength,
        }

    def build_schedule(self) -> None:
        """A subset of the `original_inference_steps` timesteps the model was distilled on."""
        n_train, n_original, n = (
            self.params.num_train_timesteps,
            self.original_inference_steps,
            self.num_inference_steps,
        )
        n_candidates = int(n_original * self.strength)
        if not n_original <= n_train or n_candidates // n < 1:
            raise ValueError(
                f"LCM needs num_inference_steps ({n}) <= original_inference_steps ({n_original}) * strength "
                f"({self.strength}) and original_inference_steps <= {n_train}"
            )
        original_timesteps = (torch.arange(1, n_candidates + 1) * (n_train // n_original) - 1).flip(0)
        indices = (torch.arange(n, dtype=torch.float64) * (n_candidates / n)).floor().long()
        self.timesteps = original_timesteps[indices]

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        """Consistency function's clean latents, re-noised to the next timestep (except after the last)."""
        timestep = self.timesteps[step]
        alpha_bar = self.alphas_cumprod[timestep]
        scaled_timestep = timestep * self.timestep_scaling
        sigma_data = 0.5
        c_skip = sigma_data**2 / (scaled_timestep**2 + sigma_data**2)
        c_out = scaled_timestep / (scaled_timestep**2 + sigma_data**2) ** 0.5
        denoised, _ = self.alpha_denoise(x, predicted_noise, alpha_bar)
        denoised = c_out * denoised + c_skip * x
        if step == self.num_inference_steps - 1:
            return denoised
        next_alpha_bar = self.alphas_cumprod[self.timesteps[step + 1]]
        noise = sample_noise(predicted_noise, generator, dtype=denoised.dtype)
        return next_alpha_bar.sqrt() * denoised + (1 - next_alpha_bar).sqrt() * noise
