"""DPM-Solver++ single-step samplers with two model evaluations per step: 2S ancestral and SDE (Lu et al., 2022).

Both work on x = x0 + sigma * noise with the Euler-like schedule (`SigmaSolver`); the intermediate evaluation's
noise level and timestep are precomputed with the schedule. Their noise comes from the run's generator.
"""

import math

import torch
from torch import Tensor

from .sigma_solver import SigmaSolver
from .solver import Evaluate, SolverParams, sample_noise, sigmas_to_timesteps, training_sigmas, upcast


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic target and the noise added after it, for an ancestral step."""
    if eta == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    return (sigma_next**2 - sigma_up**2) ** 0.5, sigma_up


class _TwoStageSolver(SigmaSolver):
    """The shared part: `eta` and `s_noise`, the midpoint sigmas (Python floats) and their timesteps."""

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

    @property
    def model_evaluations_per_step(self) -> int:
        return 2

    def midpoint(self, step: int) -> float:
        """The noise level of the step's second evaluation (0 when the step makes only one)."""
        raise NotImplementedError

    def build_schedule(self) -> None:
        super().build_schedule()
        self.midpoint_sigmas = [self.midpoint(step) for step in range(self.num_inference_steps)]
        positive = [sigma if sigma > 0 else self.sigma_values[0] for sigma in self.midpoint_sigmas]
        midpoints = torch.tensor(positive, dtype=torch.float64)
        self.midpoint_timesteps = sigmas_to_timesteps(midpoints, training_sigmas(self.alphas_cumprod)).float()

    def evaluate_at_midpoint(
        self, x: Tensor, step: int, out_dtype: torch.dtype, evaluate: Evaluate | None
    ) -> Tensor:
        """The denoised latents from the model's prediction for `x` at the step's midpoint sigma."""
        if evaluate is None:
            raise ValueError(f"{type(self).__name__} evaluates the model twice per step: pass `evaluate`")
        sigma = self.midpoint_sigmas[step]
        prediction = evaluate(self.scale_input_at(x, sigma).to(out_dtype), self.midpoint_timesteps[step])
        return self.denoise(x, upcast(prediction), sigma)

    def noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        return sample_noise(like, generator, dtype=torch.float32).to(like.dtype)


class DPMPlusPlus2SAncestral(_TwoStageSolver):
    """DPM-Solver++(2S) ancestral, as ComfyUI's (k-diffusion's) `dpmpp_2s_ancestral`: a second-order step down to
    sigma_down through the midpoint in log sigma, then noise of scale sigma_up (one draw per step but the last)."""

    def midpoint(self, step: int) -> float:
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        sigma_down, _ = ancestral_step(sigma, sigma_next, self.eta)
        return math.sqrt(sigma * sigma_down) if sigma_down > 0 else 0.0

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        out_dtype = predicted_noise.dtype
        x = upcast(x)
        denoised = self.denoise(x, upcast(predicted_noise), sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        if sigma_down == 0:
            x = x + (x - denoised) / sigma * (sigma_down - sigma)
        else:
            h = math.log(sigma) - math.log(sigma_down)
            sigma_mid = self.midpoint_sigmas[step]
            x_mid = (sigma_mid / sigma) * x - math.expm1(-0.5 * h) * denoised
            denoised_mid = self.evaluate_at_midpoint(x_mid, step, out_dtype, evaluate)
            x = (sigma_down / sigma) * x - math.expm1(-h) * denoised_mid
        if sigma_next > 0 and sigma_up > 0 and self.s_noise > 0:
            x = x + self.noise(x, generator) * (self.s_noise * sigma_up)
        return x.to(out_dtype)


class DPMPlusPlusSDE(_TwoStageSolver):
    """DPM-Solver++ SDE (stochastic, second order, midpoint r = 1/2), as diffusers' `DPMSolverSDEScheduler` and
    ComfyUI's `dpmpp_sde`.

    Both references draw the two noises of a step from a Brownian tree (torchsde) in sigma-time; here they are
    the matching increments of a Brownian path drawn from the run's generator: z1 over [sigma_mid, sigma] and
    (sqrt(sigma - sigma_mid) z1 + sqrt(sigma_mid - sigma_next) z2) / sqrt(sigma - sigma_next) over the step, so
    the result has the references' distribution but not their samples. With `eta = 0` it is deterministic.
    """

    def midpoint(self, step: int) -> float:
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        return math.sqrt(sigma * sigma_next) if sigma_next > 0 else 0.0

    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        sigma, sigma_next = self.sigma_values[step], self.sigma_values[step + 1]
        out_dtype = predicted_noise.dtype
        x = upcast(x)
        denoised = self.denoise(x, upcast(predicted_noise), sigma)
        if sigma_next == 0:
            return (x + (x - denoised) / sigma * (sigma_next - sigma)).to(out_dtype)
        sigma_mid = self.midpoint_sigmas[step]
        noisy = self.eta > 0 and self.s_noise > 0
        first = self.noise(x, generator) if noisy else None
        # step 1: ancestral DPM-Solver++(1) to the midpoint
        sigma_down, sigma_up = ancestral_step(sigma, sigma_mid, self.eta)
        x_mid = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down) - math.log(sigma)) * denoised
        if first is not None:
            x_mid = x_mid + first * (self.s_noise * sigma_up)
        denoised_mid = self.evaluate_at_midpoint(x_mid, step, out_dtype, evaluate)
        # step 2: from x over the whole step with the midpoint's denoised latents
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, self.eta)
        x = (sigma_down / sigma) * x - math.expm1(math.log(sigma_down) - math.log(sigma)) * denoised_mid
        if first is not None:
            second = self.noise(x, generator)
            whole = ((sigma - sigma_mid) ** 0.5 * first + (sigma_mid - sigma_next) ** 0.5 * second) / (
                (sigma - sigma_next) ** 0.5
            )
            x = x + whole * (self.s_noise * sigma_up)
        return x.to(out_dtype)


__all__ = ["DPMPlusPlus2SAncestral", "DPMPlusPlusSDE", "ancestral_step"]
