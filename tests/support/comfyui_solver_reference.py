"""Run in ComfyUI's own python (see tests/foundationals/latent_diffusion/test_solvers_comfyui.py): our
schedules and solvers side by side with ComfyUI's schedulers and k-diffusion samplers; prints JSON.

    python tests/support/comfyui_solver_reference.py /path/to/ComfyUI

Schedules: our `comfyui_sigmas` against `comfy.samplers.calculate_sigmas` on an SD1.5 `ModelSamplingDiscrete`
(ComfyUI computes the training sigmas in float64, we in float32 like diffusers), the Align-Your-Steps node's
sigmas, our Beta quantile against scipy's. Solvers: both run on the same sigmas (our solver's table), from the
same latents, with the same fake model (ComfyUI's EPS / V_PREDICTION conversions on ComfyUI's side, ours on
ours) and the same noise: a generator seeded alike, drawn in the order each sampler asks for it.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

REPOSITORY = Path(__file__).resolve().parents[2]
COMFYUI = Path(sys.argv[1]).resolve()
sys.path[:0] = [str(COMFYUI), str(REPOSITORY)]  # ComfyUI's top-level modules (its `nodes`) win

import comfy.options  # noqa: E402
import scipy.stats  # noqa: E402
import torch  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu"]  # ComfyUI's device setup reads its command line on import

import comfy.k_diffusion.sampling as k_sampling  # noqa: E402
import comfy.model_sampling  # noqa: E402
import comfy.samplers  # noqa: E402
from comfy_extras.nodes_align_your_steps import AlignYourStepsScheduler  # noqa: E402

from foundationals.latent_diffusion.solvers import (  # noqa: E402
    PredictionType,
    SigmaSchedule,
    SolverParams,
    make_solver,
)
from foundationals.latent_diffusion.solvers.multistep import MultistepSolver  # noqa: E402
from foundationals.latent_diffusion.solvers.schedules import beta_quantile, comfyui_sigmas  # noqa: E402
from foundationals.latent_diffusion.solvers.solver import (  # noqa: E402
    cumulative_alphas,
    sigmas_to_timesteps,
    training_sigmas,
)

SEED = 12
SHAPE = (1, 4, 8, 8)
TRAIN_SIGMAS = training_sigmas(cumulative_alphas(SolverParams()))


def model_sampling(prediction: str) -> torch.nn.Module:
    """ComfyUI's SD1.5 sampling object (its "linear" beta schedule is diffusers' scaled_linear)."""
    kind = comfy.model_sampling.V_PREDICTION if prediction == "v_prediction" else comfy.model_sampling.EPS

    class Sampling(comfy.model_sampling.ModelSamplingDiscrete, kind):
        pass

    settings = {"beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012}
    return Sampling(SimpleNamespace(sampling_settings=settings))


def relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.double(), theirs.double()
    if ours.shape != theirs.shape:
        return math.inf
    return float((ours - theirs).abs().max() / max(1.0, float(theirs.abs().max())))


def schedules() -> dict[str, float]:
    results: dict[str, float] = {}
    sampling = model_sampling("epsilon")
    for steps in (1, 4, 10, 25, 60):
        for ours, theirs in (
            (SigmaSchedule.SIMPLE, "simple"),
            (SigmaSchedule.SGM_UNIFORM, "sgm_uniform"),
            (SigmaSchedule.BETA, "beta"),
        ):
            expected = comfy.samplers.calculate_sigmas(sampling, theirs, steps)
            results[f"schedule {theirs} {steps}"] = relative(
                comfyui_sigmas(ours, TRAIN_SIGMAS, steps), expected
            )
        for name in ("karras", "exponential"):  # the multistep solvers' conversions end where ComfyUI's do
            solver = make_solver("dpmpp_3m_sde", steps, name)
            expected = comfy.samplers.calculate_sigmas(sampling, name, steps)
            results[f"schedule {name} {steps}"] = relative(solver.sigmas, expected)
        for table, model in ((SigmaSchedule.AYS_SD15, "SD1"), (SigmaSchedule.AYS_SDXL, "SDXL")):
            expected = AlignYourStepsScheduler.execute(model, steps, 1.0).result[0]
            results[f"schedule align_your_steps {model} {steps}"] = relative(
                comfyui_sigmas(table, TRAIN_SIGMAS, steps), expected
            )
    for steps in (400, 1000):  # long beta schedules drop repeated timesteps, as ComfyUI's does
        expected = comfy.samplers.calculate_sigmas(sampling, "beta", steps)
        solver = make_solver("euler", steps, "beta")
        results[f"schedule beta {steps} ({solver.num_inference_steps} steps)"] = relative(
            solver.sigmas, expected
        )
    quantiles = [index / 200 for index in range(201)] + [1e-6, 1 - 1e-6]
    results["beta quantile"] = max(
        abs(beta_quantile(q, a, b) - float(scipy.stats.beta.ppf(q, a, b)))
        for q in quantiles
        for a, b in ((0.6, 0.6), (0.5, 0.7), (2.0, 3.0))
    )
    return results


class Denoiser:
    """k-diffusion's model: denoised latents for x (sigma parametrisation) at sigma, through ComfyUI's conversions."""

    def __init__(self, sampling: torch.nn.Module, solver: object) -> None:
        self.sampling, self.solver = sampling, solver
        self.inner_model = SimpleNamespace(
            inner_model=SimpleNamespace(model_sampling=sampling),
            model_patcher=SimpleNamespace(get_model_object=lambda name: sampling),
        )

    def timestep(self, sigma: float) -> torch.Tensor:
        table = self.solver.sigma_values  # type: ignore[attr-defined]
        for index, value in enumerate(table[:-1]):
            if abs(value - sigma) <= 1e-6 * value:
                return self.solver.timesteps[index]  # type: ignore[attr-defined]
        return sigmas_to_timesteps(torch.tensor([sigma], dtype=torch.float64), TRAIN_SIGMAS).float()[0]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        model_input = self.sampling.calculate_input(sigma, x)
        prediction = fake_model(model_input, self.timestep(float(sigma[0])))
        return self.sampling.calculate_denoised(sigma, prediction, x)


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.1 * x + torch.sin(torch.as_tensor(t, dtype=torch.float32) / 100)


def noise_sampler(kind: str) -> object:
    generator = torch.Generator("cpu").manual_seed(SEED)
    state: dict[str, object] = {}

    def draw() -> torch.Tensor:
        return torch.randn(SHAPE, generator=generator, dtype=torch.float32)

    def independent(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return draw()

    def brownian(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        """DPM++ SDE asks for [sigma, sigma_mid] then [sigma, sigma_next]: increments of one Brownian path."""
        if "first" not in state:
            state["first"], state["mid"] = draw(), float(sigma_next)
            return state["first"]  # type: ignore[return-value]
        first, mid = state.pop("first"), state.pop("mid")
        start, end = float(sigma), float(sigma_next)
        second = draw()
        return ((start - mid) ** 0.5 * first + (mid - end) ** 0.5 * second) / (start - end) ** 0.5  # type: ignore[operator]

    return brownian if kind == "brownian" else independent


SOLVERS = {
    # ours: (k-diffusion sampler, noise kind or None)
    "euler": ("sample_euler", None),
    "euler_ancestral": ("sample_euler_ancestral", "independent"),
    "heun": ("sample_heun", None),
    "lms": ("sample_lms", None),
    "dpmpp_2s_ancestral": ("sample_dpmpp_2s_ancestral", "independent"),
    "dpmpp_sde": ("sample_dpmpp_sde", "brownian"),
    "dpmpp_2m": ("sample_dpmpp_2m", None),
    "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", "independent"),
    "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde_heun", "independent"),
    "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", "independent"),
}


def run_ours(solver: object, x: torch.Tensor) -> list[torch.Tensor]:
    """Latents in the sigma parametrisation at the start of each step, then the result."""
    generator = torch.Generator("cpu").manual_seed(SEED)
    vp = isinstance(solver, MultistepSolver)
    states = []
    for step in solver.inference_steps:  # type: ignore[attr-defined]
        sigma = solver.sigma_values[step]  # type: ignore[attr-defined]
        states.append(x * (sigma**2 + 1) ** 0.5 if vp else x)
        prediction = fake_model(solver.scale_model_input(x, step), solver.timesteps[step])  # type: ignore[attr-defined]
        x = solver(x, prediction, step, generator=generator, evaluate=fake_model)  # type: ignore[operator]
    return [*states, x]


def run_comfyui(
    name: str, solver: object, sampling: torch.nn.Module, x_start: torch.Tensor
) -> list[torch.Tensor]:
    sampler_name, noise = SOLVERS[name]
    states: list[torch.Tensor] = []
    options = {} if noise is None else {"noise_sampler": noise_sampler(noise)}
    result = getattr(k_sampling, sampler_name)(
        Denoiser(sampling, solver),
        x_start,
        solver.sigmas.clone(),  # type: ignore[attr-defined]
        extra_args={},
        callback=lambda info: states.append(info["x"].clone()),
        disable=True,
        **options,
    )
    return [*states, result]


def solvers() -> dict[str, float]:
    results: dict[str, float] = {}
    for name in SOLVERS:
        for schedule, steps, prediction in (
            ("karras", 12, "epsilon"),
            ("sgm_uniform", 9, "epsilon"),
            ("align_your_steps", 10, "v_prediction"),
            ("beta", 7, "v_prediction"),
        ):
            solver = make_solver(name, steps, schedule, prediction_type=PredictionType(prediction))
            x = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0)) * solver.init_noise_sigma
            ours = run_ours(solver, x)
            theirs = run_comfyui(name, solver, model_sampling(prediction), ours[0].clone())
            key = f"solver {name} {schedule} {steps} {prediction}"
            if name == "lms":  # ComfyUI's last step returns the denoised latents; diffusers' (and ours) steps
                results[key + " (all but the last step)"] = max(
                    relative(a, b) for a, b in zip(ours[:-1], theirs[:-1])
                )
            else:
                results[key] = max(relative(a, b) for a, b in zip(ours, theirs, strict=True))
    return results


if __name__ == "__main__":
    print(json.dumps({**schedules(), **solvers()}))
