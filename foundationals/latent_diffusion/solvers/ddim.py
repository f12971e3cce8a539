"""DDIM (Song et al., 2020): the deterministic (eta=0) implicit sampler, or partly stochastic with eta."""

import torch
from torch import Tensor

from .solver import Evaluate, Solver, SolverParams, sample_noise, spaced_timesteps


class DDIM(Solver):
    """Denoising Diffusion Implicit Models, as diffusers' `DDIMScheduler` with `set_alpha_to_one=False`."""

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        eta: float = 0.0,
    ) -> None:
        self.eta = eta
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        """The stochasticity `eta`."""
        return {"eta": self.eta}

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
        """One DDIM update from the timestep of `step` down by num_train_timesteps // num_inference_steps."""
        timestep = int(self.timestep_values[step])
        # diffusers steps down by a fixed stride whatever the spacing (so not always onto the next timestep)
        previous_timestep = timestep - self.params.num_train_timesteps // self.num_inference_steps
        alpha_bar = self.alphas_cumprod[timestep]
        # SD's config has set_alpha_to_one=False: below timestep 0 the level of timestep 0 is used
        previous_alpha_bar = self.alphas_cumprod[max(previous_timestep, 0)]
        denoised, noise = self.alpha_denoise(x, predicted_noise, alpha_bar)
        variance = (1 - previous_alpha_bar) / (1 - alpha_bar) * (1 - alpha_bar / previous_alpha_bar)
        std = self.eta * variance**0.5
        x = previous_alpha_bar**0.5 * denoised + (1 - previous_alpha_bar - std**2) ** 0.5 * noise
        if self.eta > 0:
            x = x + std * sample_noise(predicted_noise, generator)
        return x
