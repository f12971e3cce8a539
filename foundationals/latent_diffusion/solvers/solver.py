"""What every solver shares: the parameters, the training noise schedule, timestep spacings and sigmas.

The schedules reproduce diffusers' arithmetic (float32 where it uses torch, float64 where it uses
numpy) so that trajectories agree with diffusers' schedulers to float32 rounding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor


class TimestepSpacing(str, Enum):
    """How the inference timesteps are picked among the training ones (diffusers' `timestep_spacing`)."""

    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


class NoiseSchedule(str, Enum):
    """How the diffusion rate (beta) grows over the training timesteps (diffusers' `beta_schedule`)."""

    SCALED_LINEAR = "scaled_linear"
    LINEAR = "linear"


class SigmaSchedule(str, Enum):
    """Noise levels for sigma-based solvers other than the spaced training timesteps' own.

    KARRAS, EXPONENTIAL and BETA_SIGMAS are diffusers' `use_karras_sigmas`, `use_exponential_sigmas` and
    `use_beta_sigmas` (each solver takes their end points where its diffusers scheduler does). BETA, SIMPLE,
    SGM_UNIFORM and the Align-Your-Steps tables are ComfyUI's schedulers of those names (`schedules.py`).
    """

    KARRAS = "karras"
    EXPONENTIAL = "exponential"
    BETA_SIGMAS = "beta_sigmas"
    BETA = "beta"
    SIMPLE = "simple"
    SGM_UNIFORM = "sgm_uniform"
    AYS_SD15 = "ays_sd15"
    AYS_SDXL = "ays_sdxl"


class PredictionType(str, Enum):
    """What the denoising model predicts: the noise, the velocity v (Salimans & Ho, 2022) or the clean sample."""

    EPSILON = "epsilon"
    V_PREDICTION = "v_prediction"
    SAMPLE = "sample"


@dataclass(frozen=True)
class SolverParams:
    """Schedule parameters; the defaults are SD1.5's and SDXL's diffusers scheduler config."""

    num_train_timesteps: int = 1000
    timesteps_spacing: TimestepSpacing = TimestepSpacing.LEADING
    timesteps_offset: int = 1
    initial_diffusion_rate: float = 0.00085
    final_diffusion_rate: float = 0.012
    noise_schedule: NoiseSchedule = NoiseSchedule.SCALED_LINEAR
    sigma_schedule: SigmaSchedule | None = None
    prediction_type: PredictionType = PredictionType.EPSILON
    rescale_betas_zero_snr: bool = False
    """Zero terminal SNR (Lin et al., 2023): the last training timestep is pure noise (diffusers' option)."""


TERMINAL_ALPHA_BAR = 2.0**-24
"""What sigma-based solvers put in place of the zero last alpha_bar of a zero-terminal-SNR schedule (diffusers)."""


def zero_terminal_snr_betas(betas: Tensor) -> Tensor:
    """Betas rescaled so that sqrt(alpha_bar) keeps its first value and reaches 0 at the last timestep.

    Lin et al. (2023), "Common Diffusion Noise Schedules and Sample Steps are Flawed", algorithm 1: shift
    sqrt(alpha_bar) down by its last value, scale it back to its first value, then undo the cumulative product.
    """
    root = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


def cumulative_alphas(params: SolverParams, clamp_terminal: bool = False) -> Tensor:
    """The training schedule's cumulative product of (1 - beta), in float32 like diffusers.

    With `rescale_betas_zero_snr` the last value is 0, or `TERMINAL_ALPHA_BAR` with `clamp_terminal` (solvers
    that need a finite largest sigma, as diffusers' Euler, DPM-Solver and UniPC schedulers do).
    """
    n, start, end = params.num_train_timesteps, params.initial_diffusion_rate, params.final_diffusion_rate
    match params.noise_schedule:
        case NoiseSchedule.SCALED_LINEAR:
            betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float32) ** 2
        case NoiseSchedule.LINEAR:
            betas = torch.linspace(start, end, n, dtype=torch.float32)
        case _:
            raise ValueError(f"unknown noise schedule {params.noise_schedule!r}")
    if params.rescale_betas_zero_snr:
        betas = zero_terminal_snr_betas(betas)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if params.rescale_betas_zero_snr and clamp_terminal:
        alphas_cumprod[-1] = TERMINAL_ALPHA_BAR
    return alphas_cumprod


def spaced_timesteps(params: SolverParams, num_inference_steps: int, round_linspace: bool = True) -> Tensor:
    """Descending float64 timesteps for DDIM, DDPM and Euler (Euler keeps linspace ones unrounded)."""
    n_train, n = params.num_train_timesteps, num_inference_steps
    match params.timesteps_spacing:
        case TimestepSpacing.LINSPACE:
            timesteps = torch.linspace(0, n_train - 1, n, dtype=torch.float64)
            timesteps = timesteps.round() if round_linspace else timesteps
            return timesteps.flip(0)
        case TimestepSpacing.LEADING:
            return (torch.arange(n, dtype=torch.float64) * (n_train // n)).flip(0) + params.timesteps_offset
        case TimestepSpacing.TRAILING:
            return torch.arange(n_train, 0, -n_train / n, dtype=torch.float64).round() - 1
        case _:
            raise ValueError(f"unknown timestep spacing {params.timesteps_spacing!r}")


def training_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """Noise-to-signal ratio sqrt((1 - alpha_bar) / alpha_bar) of every training timestep (float32)."""
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def interpolate(x: Tensor, values: Tensor) -> Tensor:
    """Piecewise-linear `values[x]` for fractional indices `x`, in float64 (as `numpy.interp`)."""
    x, values = x.to(torch.float64), values.to(torch.float64)
    low = x.floor().long().clamp(0, len(values) - 2)
    return (values[low + 1] - values[low]) * (x - low) + values[low]


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> Tensor:
    """Karras et al. (2022) noise levels, evenly spaced in sigma^(1/rho), descending (float64)."""
    ramp = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigmas_to_timesteps(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """Fractional training timesteps of the given noise levels, by linear interpolation in log sigma."""
    log_train = train_sigmas.log()  # float32 like diffusers' np.log (whose SIMD log may differ by 1 ulp)
    log_sigma = sigmas.to(torch.float64).clamp(min=1e-10).log()
    distances = log_sigma[None, :] - log_train[:, None]
    low = (distances >= 0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_train) - 2)
    low_log, high_log = log_train[low], log_train[low + 1]
    weight = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
    return (1 - weight) * low + weight * (low + 1)


def first_inference_step_from_strength(num_inference_steps: int, strength: float) -> int:
    """First step of an img2img run at denoising `strength`, as diffusers' img2img pipelines compute it."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength}")
    init_timestep = min(int(num_inference_steps * strength), num_inference_steps)
    return max(num_inference_steps - init_timestep, 0)


Evaluate = Callable[[Tensor, Tensor], Tensor]
"""The model (with guidance) as a solver sees it: (scaled model input, timestep) -> prediction."""


class Solver(ABC):
    """A timestep schedule plus the update rule that moves latents one inference step down it.

    The sampling loop calls the model once per step at `timesteps[step]` on `scale_model_input(x, step)` and
    hands the prediction to `__call__`. Solvers with more than one model evaluation per step (Heun, DPM++ 2S,
    DPM++ SDE) make the extra ones through the `evaluate` function the loop passes in.
    """

    timesteps: Tensor
    clamp_terminal_alpha: bool = False
    """Whether a zero-terminal-SNR schedule's last alpha_bar is replaced by `TERMINAL_ALPHA_BAR` (see
    `cumulative_alphas`): sigma-based solvers need a finite largest sigma."""

    def __init__(
        self,
        num_inference_steps: int,
        first_inference_step: int = 0,
        params: SolverParams | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.params = params or SolverParams()
        if not 1 <= num_inference_steps <= self.params.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must lie in [1, {self.params.num_train_timesteps}], got {num_inference_steps}"
            )
        if not 0 <= first_inference_step <= num_inference_steps:
            raise ValueError(
                f"first_inference_step must lie in [0, {num_inference_steps}], got {first_inference_step}"
            )
        self.num_inference_steps = num_inference_steps
        self.requested_steps = num_inference_steps
        self.first_inference_step = first_inference_step
        self.alphas_cumprod = cumulative_alphas(self.params, clamp_terminal=self.clamp_terminal_alpha)
        self.build_schedule()
        self._refuse_division_by_zero_alpha()
        self.timestep_values: list[float] = self.timesteps.tolist()  # read per step without a device sync
        self.device, self.dtype = torch.device(device), dtype
        self.to(device, dtype)

    def _refuse_division_by_zero_alpha(self) -> None:
        """A zero-terminal-SNR schedule's last timestep has alpha_bar = 0: x0 = (x - noise) / 0 for epsilon models."""
        if not self.params.rescale_betas_zero_snr or self.params.prediction_type != PredictionType.EPSILON:
            return
        if self.clamp_terminal_alpha or self.timesteps.is_floating_point():
            return
        if bool((self.alphas_cumprod[self.timesteps.clamp(min=0)] == 0).any()):
            raise ValueError(
                f"{type(self).__name__} cannot sample an epsilon-prediction model with zero terminal SNR from the "
                "pure-noise timestep (alpha_bar = 0): sample it as v_prediction, or pick a sigma-based solver "
                "(euler, dpmpp_2m, uni_pc, ...) or the normal schedule"
            )

    @abstractmethod
    def build_schedule(self) -> None:
        """Compute `timesteps` (and any per-step noise levels) for `num_inference_steps`."""

    @abstractmethod
    def __call__(
        self,
        x: Tensor,
        predicted_noise: Tensor,
        step: int,
        generator: torch.Generator | None = None,
        evaluate: Evaluate | None = None,
    ) -> Tensor:
        """Latents at the next step, from the latents `x` at `step` and the model's prediction for them.

        `generator` draws any noise the solver adds; `evaluate` runs the model again where the solver needs
        more than one evaluation per step (the others ignore it).
        """

    def adopt_step_count(self, count: int) -> None:
        """Run `count` steps: a schedule that drops repeated noise levels (ComfyUI's beta) has fewer."""
        if count != self.num_inference_steps:
            self.num_inference_steps = count
            self.first_inference_step = min(self.first_inference_step, count)

    @property
    def model_evaluations_per_step(self) -> int:
        """How many times a step runs the model at most (2 for Heun-like solvers, which use `evaluate`)."""
        return 1

    @property
    def inference_steps(self) -> range:
        """Indices of the steps to run: from `first_inference_step` to the end."""
        return range(self.first_inference_step, self.num_inference_steps)

    @property
    def init_noise_sigma(self) -> float:
        """Standard deviation of the pure noise that starts text-to-image sampling."""
        return 1.0

    def scale_model_input(self, x: Tensor, step: int) -> Tensor:
        """Latents as the denoising model expects them at `step`."""
        return x

    def add_noise(self, x: Tensor, noise: Tensor, step: int) -> Tensor:
        """Clean latents noised to the level of `step` (the start of image-to-image)."""
        alpha_bar = self.alphas_cumprod[int(self.timestep_values[step])].to(x.dtype)
        return alpha_bar**0.5 * x + (1 - alpha_bar) ** 0.5 * noise

    def first_step_from_strength(self, strength: float) -> int:
        """First inference step of an img2img run at denoising `strength` (1: all steps, 0: none)."""
        return first_inference_step_from_strength(self.num_inference_steps, strength)

    def rebuild(
        self, num_inference_steps: int | None = None, first_inference_step: int | None = None
    ) -> Solver:
        """A fresh solver of the same kind and parameters, with new step counts and no history."""
        return type(self)(
            num_inference_steps=self.requested_steps if num_inference_steps is None else num_inference_steps,
            first_inference_step=self.first_inference_step
            if first_inference_step is None
            else first_inference_step,
            params=self.params,
            device=self.device,
            dtype=self.dtype,
            **self.extra_arguments(),
        )

    def extra_arguments(self) -> dict[str, object]:
        """Constructor arguments of a subclass beyond the base ones (for `rebuild`)."""
        return {}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Solver:
        """Move the schedule to `device`; cast its floating-point tensors to `dtype`."""
        self.device = self.device if device is None else torch.device(device)
        self.dtype = self.dtype if dtype is None else dtype
        for name, value in list(vars(self).items()):
            if isinstance(value, Tensor):
                value = value.to(self.device)
                setattr(self, name, value.to(self.dtype) if value.is_floating_point() else value)
        return self

    def alpha_denoise(self, x: Tensor, prediction: Tensor, alpha_bar: Tensor) -> tuple[Tensor, Tensor]:
        """Predicted clean latents and noise from the model output, for alpha-parametrised solvers."""
        beta_bar = 1 - alpha_bar
        match self.params.prediction_type:
            case PredictionType.EPSILON:
                return (x - beta_bar**0.5 * prediction) / alpha_bar**0.5, prediction
            case PredictionType.V_PREDICTION:
                return (
                    alpha_bar**0.5 * x - beta_bar**0.5 * prediction,
                    alpha_bar**0.5 * prediction + beta_bar**0.5 * x,
                )
            case PredictionType.SAMPLE:
                return prediction, (x - alpha_bar**0.5 * prediction) / beta_bar**0.5
            case _:
                raise ValueError(f"unknown prediction type {self.params.prediction_type!r}")

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_inference_steps={self.num_inference_steps}, "
            f"first_inference_step={self.first_inference_step}, params={self.params})"
        )


def sample_noise(like: Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> Tensor:
    """Gaussian noise shaped like `like`, drawn on the generator's device (as diffusers' `randn_tensor`)."""
    device = like.device if generator is None else generator.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=dtype or like.dtype)
    return noise.to(like.device)


def upcast(x: Tensor) -> Tensor:
    """`x` in at least float32 precision (half-precision latents are updated in float32)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def log_snr(alpha: Tensor, sigma: Tensor) -> Tensor:
    """Half log signal-to-noise ratio, lambda = log(alpha) - log(sigma)."""
    return torch.log(alpha) - torch.log(sigma)


def sigma_denoise(
    x: Tensor, prediction: Tensor, sigma: float | Tensor, prediction_type: PredictionType
) -> Tensor:
    """Predicted clean latents for latents `x = x0 + sigma * noise` (the sigma parametrisation, as Euler's)."""
    match prediction_type:
        case PredictionType.EPSILON:
            return x - sigma * prediction
        case PredictionType.V_PREDICTION:
            return prediction * (-sigma / (sigma**2 + 1) ** 0.5) + x / (sigma**2 + 1)
        case PredictionType.SAMPLE:
            return prediction
        case _:
            raise ValueError(f"unknown prediction type {prediction_type!r}")


__all__ = [
    "TERMINAL_ALPHA_BAR",
    "Evaluate",
    "NoiseSchedule",
    "PredictionType",
    "SigmaSchedule",
    "Solver",
    "SolverParams",
    "TimestepSpacing",
    "cumulative_alphas",
    "first_inference_step_from_strength",
    "interpolate",
    "karras_sigmas",
    "log_snr",
    "sample_noise",
    "sigma_denoise",
    "sigmas_to_timesteps",
    "spaced_timesteps",
    "training_sigmas",
    "upcast",
    "zero_terminal_snr_betas",
]
