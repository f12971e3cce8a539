"""DPM-Solver++ (Lu et al., 2022): multistep exponential integrator in log-SNR, and its SDE variant."""

import torch
from torch import Tensor

from .solver import (
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
    karras_sigmas,
    log_snr,
    sample_noise,
    sigmas_to_timesteps,
    training_sigmas,
    upcast,
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


def alpha_sigma(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Signal and noise scales (alpha_t, sigma_t) of the variance-preserving process at noise ratio `sigma`."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha, sigma * alpha


class DPMSolver(Solver):
    """DPM-Solver++ 2M: second-order multistep, first order at the first and last steps (final sigma 0).

    As diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`.
    """

    stochastic: bool = False

    def build_schedule(self) -> None:
        """Integer timesteps, their noise ratios `sigmas` (Karras or interpolated), plus a final 0."""
        train_sigmas = training_sigmas(self.alphas_cumprod)
        if self.params.sigma_schedule == SigmaSchedule.KARRAS:
            sigmas = karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), self.num_inference_steps)
            timesteps = sigmas_to_timesteps(sigmas, train_sigmas).round()
        else:
            timesteps = dpm_timesteps(self.params, self.num_inference_steps)
            sigmas = train_sigmas[timesteps.long()]
        self.timesteps = timesteps.long()
        self.sigmas = torch.cat([sigmas.float(), torch.zeros(1)])
        self.previous: tuple[int, Tensor] | None = None  # (step, predicted clean latents) of the last call

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """Clean latents noised to the level of `step`."""
        alpha, sigma = alpha_sigma(self.sigmas[step].to(x.dtype))
        return alpha * x + sigma * noise

    def __call__(
        self, x: Tensor, predicted_noise: Tensor, step: int, generator: torch.Generator | None = None
    ) -> Tensor:
        """One update: second order from the prediction at `step - 1` when this run made one, else first order."""
        out_dtype = predicted_noise.dtype
        alpha_s0, sigma_s0 = alpha_sigma(self.sigmas[step])
        match self.params.prediction_type:
            case PredictionType.EPSILON:
                denoised = (x - sigma_s0 * predicted_noise) / alpha_s0
            case PredictionType.V_PREDICTION:
                denoised = alpha_s0 * x - sigma_s0 * predicted_noise
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
            if noise is None:
                x = x - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * correction
            else:
                x = x + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * correction
        if noise is not None:
            x = x + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        return x.to(out_dtype)


class DPMSolverSDE(DPMSolver):
    """SDE-DPM-Solver++ 2M: the stochastic variant, fresh noise each step.

    As diffusers' `DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)`.
    """

    stochastic = True
