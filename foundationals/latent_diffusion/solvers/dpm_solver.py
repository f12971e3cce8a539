"""DPM-Solver++ (Lu et al., 2022): multistep exponential integrators in log-SNR, and their SDE variants."""

import math

import torch
from torch import Tensor

from .multistep import MultistepSolver, dpm_timesteps, half_log_snr, vp_scales
from .solver import Evaluate, PredictionType, SolverParams, log_snr, sample_noise, upcast


def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales (alpha_t, sigma_t) of the variance-preserving process at noise ratio `sigma`."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


class DPMSolver(MultistepSolver):
    """DPM-Solver++ 2M: second-order multistep, first order at the first and last steps (final sigma 0).

    As diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`.
    """

    stochastic: bool = False

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        solver_type: str = "midpoint",
    ) -> None:
        if solver_type not in ("midpoint", "heun"):
            raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
        self.solver_type = solver_type
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        return {"solver_type": self.solver_type}

    def build_schedule(self) -> None:
        """Integer timesteps, their noise ratios `sigmas` (spaced, Karras, ...), plus a final 0."""
        super().build_schedule()
        self.previous: tuple[int, Tensor] | None = None  # (step, predicted clean latents) of the last call

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """Clean latents noised to the level of `step`."""
        alpha, sigma = alpha_sigma(self.sigmas[step].to(x.dtype))
        return alpha * x + sigma * noise

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        """One update: second order from the prediction at `step - 1` when this run made one, else first order."""
        out_dtype = predicted_noise.dtype
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[step])
        match self.params.prediction_type:
            case PredictionType.EPSILON:
                denoised = (x - sigma_s0 * predicted_noise) / alpha_s0
            case PredictionType.V_PREDICTION:
                denoised = alpha_s0 * x - sigma_s0 * predicted_noise
            case PredictionType.SAMPLE:
                denoised = predicted_noise
            case _:
                raise ValueError(f"unknown prediction type {self.params.prediction_type!r}")
        # second order needs this run's prediction at step - 1; the final sigma is 0, so the last step is
        # always first order (diffusers' lower_order_final)
        previous = self.previous
        self.previous = (step, denoised)
        use_previous = (
            previous is not None
            and previous[0] == step - 1
            and step != self.first_inference_step
            and step != self.num_inference_steps - 1
        )
        x = upcast(x)
        noise = sample_noise(denoised, generator, dtype=torch.float32) if self.stochastic else None

        alpha_t, sigma_t = alpha_sigma(self.sigmas[step + 1])
        h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s0, sigma_s0)
        if noise is None:
            x = (sigma_t / sigma_s0) * x - (alpha_t * (torch.exp(-h) - 1.0)) * denoised
        else:
            x = (sigma_t / sigma_s0 * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * denoised
        if use_previous and previous is not None:
            alpha_s1, sigma_s1 = alpha_sigma(self.sigmas[step - 1])
            r0 = (log_snr(alpha_s0, sigma_s0) - log_snr(alpha_s1, sigma_s1)) / h
            correction = (1.0 / r0) * (denoised - previous[1])
            match (noise is None, self.solver_type):
                case (True, "midpoint"):
                    x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * correction
                case (True, _):
                    x = x + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * correction
                case (False, "midpoint"):
                    x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * correction
                case (False, _):
                    x = x + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * correction
        if noise is not None:
            x = x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        return x.to(out_dtype)


class DPMSolverSDE(DPMSolver):
    """SDE-DPM-Solver++ 2M: the stochastic variant, fresh noise each step; `solver_type` "midpoint" (ComfyUI's
    `dpmpp_2m_sde`) or "heun" (`dpmpp_2m_sde_heun`).

    As diffusers' `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)`.
    """

    stochastic = True


class DPMSolver3MSDE(MultistepSolver):
    """DPM-Solver++(3M) SDE, as ComfyUI's (k-diffusion's) `dpmpp_3m_sde`: third-order multistep with `eta`
    (1: the SDE, 0: the ODE) and noise scale `s_noise`; the last step, down to sigma 0, returns the denoised
    latents. One noise draw per step from the run's generator (ComfyUI draws from a Brownian tree: same law,
    other samples). diffusers has no counterpart (its third-order sde-dpmsolver++ update differs).
    """

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        eta: float = 1.0,
        s_noise: float = 1.0,
    ) -> None:
        self.eta, self.s_noise = eta, s_noise
        super().__init__(num_inference_steps, first_inference_step, params, device, dtype)

    def extra_arguments(self) -> dict[str, object]:
        return {"eta": self.eta, "s_noise": self.s_noise}

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
        denoised = self.data_prediction(x, upcast(predicted_noise), step)
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        history = self.recent(step)
        h = half_log_snr(sigma_next) - half_log_snr(sigma)
        self.record(step, (denoised, h), keep=2)
        if sigma_next == 0:
            return denoised.to(out_dtype)
        h_eta = h * (self.eta + 1)
        alpha_t, sigma_t = vp_scales(sigma_next)
        _, sigma_s = vp_scales(sigma)
        x = (sigma_t / sigma_s * math.exp(-h * self.eta)) * x + (-alpha_t * math.expm1(-h_eta)) * denoised
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        if len(history) >= 2:
            (denoised_1, h_1), (denoised_2, h_2) = history[0], history[1]  # type: ignore[misc]
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_3 = phi_2 / h_eta - 0.5
            x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
        elif history:
            denoised_1, h_1 = history[0]  # type: ignore[misc]
            x = x + (alpha_t * phi_2 * h / h_1) * (denoised - denoised_1)
        if self.eta > 0 and self.s_noise > 0:
            noise = sample_noise(x, generator, dtype=torch.float32)
            x = x + noise * (sigma_t * math.sqrt(-math.expm1(-2 * h * self.eta)) * self.s_noise)
        return x.to(out_dtype)


__all__ = ["DPMSolver", "DPMSolver3MSDE", "DPMSolverSDE", "alpha_sigma", "dpm_timesteps"]
