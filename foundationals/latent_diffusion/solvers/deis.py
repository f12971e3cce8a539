"""DEIS (Zhang & Chen, 2023): diffusion exponential integrator sampler, multistep in log rho (the noise ratio)."""

import math

import torch
from torch import Tensor

from .multistep import MultistepSolver, vp_scales
from .solver import Evaluate, SolverParams, upcast


def _integral_2(t: float, b: float, c: float) -> float:
    """An antiderivative in t of the Lagrange basis (log t - log c) / (log b - log c) (times dt)."""
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _integral_3(t: float, b: float, c: float, d: float) -> float:
    """An antiderivative in t of (log t - log c)(log t - log d) / ((log b - log c)(log b - log d))."""
    log_t, log_c, log_d = math.log(t), math.log(c), math.log(d)
    numerator = t * (log_c * (log_d - log_t + 1) - log_d * log_t + log_d + log_t**2 - 2 * log_t + 2)
    return numerator / ((math.log(b) - log_c) * (math.log(b) - log_d))


class DEIS(MultistepSolver):
    """DEIS multistep ("logrho" solver on the noise prediction) of `order` 1 to 3, as diffusers'
    `DEISMultistepScheduler(lower_order_final=True)`: first order at the start and, for fewer than 15 steps,
    lower orders at the end.

    Its schedule ends where diffusers' does: at the smallest training sigma after spaced timesteps, at the
    last sigma repeated after converted ones (the last step then changes nothing). Down to a sigma of 0
    (ComfyUI's schedules) the last step is first order and returns the data prediction.
    """

    final_sigma = "sigma_min"

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        order: int = 2,
    ) -> None:
        if not 1 <= order <= 3:
            raise ValueError(f"DEIS order must lie in [1, 3], got {order}")
        self.order = order
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        return {"order": self.order}

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        out_dtype = predicted_noise.dtype
        x = upcast(x)
        alpha_s, sigma_s = vp_scales(self.sigma_values[step])
        noise = (x - alpha_s * self.data_prediction(x, upcast(predicted_noise), step)) / sigma_s
        previous = self.recent(step)
        self.record(step, noise, keep=self.order)
        n = self.num_inference_steps
        short = n < 15
        sigma_next = self.sigma_values[step + 1]
        order = min(self.order, len(previous) + 1)
        if (step == n - 1 and short) or sigma_next == 0:
            order = 1
        elif step == n - 2 and short:
            order = min(order, 2)
        alpha_t, sigma_t = vp_scales(sigma_next)
        if order == 1:
            # (alpha_t / alpha_s) x - sigma_t (e^h - 1) noise, with sigma_t e^h = alpha_t rho_s (exact at sigma_t 0)
            return ((alpha_t / alpha_s) * x - (alpha_t * sigma_s / alpha_s - sigma_t) * noise).to(out_dtype)
        # rho = sigma_vp / alpha is the noise ratio sigma itself
        rho_t, rho_s0, rho_s1 = sigma_next, self.sigma_values[step], self.sigma_values[step - 1]
        if order == 2:
            coefficient_0 = _integral_2(rho_t, rho_s0, rho_s1) - _integral_2(rho_s0, rho_s0, rho_s1)
            coefficient_1 = _integral_2(rho_t, rho_s1, rho_s0) - _integral_2(rho_s0, rho_s1, rho_s0)
            update = coefficient_0 * noise + coefficient_1 * previous[0]
        else:
            rho_s2 = self.sigma_values[step - 2]
            coefficient_0 = _integral_3(rho_t, rho_s0, rho_s1, rho_s2) - _integral_3(
                rho_s0, rho_s0, rho_s1, rho_s2
            )
            coefficient_1 = _integral_3(rho_t, rho_s1, rho_s2, rho_s0) - _integral_3(
                rho_s0, rho_s1, rho_s2, rho_s0
            )
            coefficient_2 = _integral_3(rho_t, rho_s2, rho_s0, rho_s1) - _integral_3(
                rho_s0, rho_s2, rho_s0, rho_s1
            )
            update = coefficient_0 * noise + coefficient_1 * previous[0] + coefficient_2 * previous[1]
        return (alpha_t * (x / alpha_s + update)).to(out_dtype)


__all__ = ["DEIS"]
