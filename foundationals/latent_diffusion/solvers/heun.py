"""Heun's method (Karras et al., 2022, algorithm 2 without churn): an Euler step corrected by the slope at its end."""

import torch
from torch import Tensor

from .sigma_solver import SigmaSolver
from .solver import Evaluate, upcast


class Heun(SigmaSolver):
    """Second-order ODE solver on x / alpha, as diffusers' `HeunDiscreteScheduler` (and ComfyUI's `heun`).

    Each step but the last evaluates the model twice: at its sigma, then at the next sigma on the Euler
    prediction (the next step's timestep); the last step, down to sigma 0, is a plain Euler step.
    """

    @property
    def model_evaluations_per_step(self) -> int:
        return 2

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        """Euler to the next sigma, then the average of the slopes at both ends (Euler only down to 0)."""
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        out_dtype = predicted_noise.dtype
        x = upcast(x)
        slope = (x - self.denoise(x, predicted_noise, sigma)) / sigma
        dt = sigma_next - sigma
        euler = x + slope * dt
        if sigma_next == 0:
            return euler.to(out_dtype)
        if evaluate is None:
            raise ValueError("Heun evaluates the model twice per step: pass the model function as `evaluate`")
        prediction = upcast(
            evaluate(self.scale_input_at(euler, sigma_next).to(out_dtype), self.timesteps[step + 1])
        )
        slope_next = (euler - self.denoise(euler, prediction, sigma_next)) / sigma_next
        return (x + (slope + slope_next) * (0.5 * dt)).to(out_dtype)
