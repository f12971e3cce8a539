"""Solvers against diffusers' schedulers: same timesteps, same trajectories from the same "model" and noise.

The fake model depends on the timestep, so a solver that feeds the model a wrong timestep, or steps to a
wrong noise level, diverges from the reference within a step or two.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
)

from foundationals.latent_diffusion.solvers import (
    DDIM,
    DDPM,
    LCM,
    DPMSolver,
    DPMSolverSDE,
    Euler,
    EulerAncestral,
    NoiseSchedule,
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
    first_inference_step_from_strength,
)
from tests.support.parity import check_parity

# diffusers 0.39 calls np.array on torch tensors the way numpy 2 deprecates; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

SHAPE = (1, 4, 8, 8)
SEED = 12
# Measured on this machine (torch 2.13 CPU, diffusers 0.39): every trajectory is bit-identical (max diff 0.0)
# except Euler and Euler ancestral with Karras sigmas, whose fractional timesteps differ by 1 ulp (see
# assert_same_timesteps): there Euler's max diff is 1.9e-6 and Euler ancestral's 7.6e-6 on latents of magnitude
# up to 55 (1.4e-7 relative); fed diffusers' timesteps, those are bit-identical too.

SPACINGS = list(TimestepSpacing)
KARRAS = SigmaSchedule.KARRAS
PREDICTIONS = [PredictionType.EPSILON, PredictionType.V_PREDICTION]
ALL_PREDICTIONS = list(PredictionType)  # "sample" too, for the schedulers of diffusers that take it


def fake_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for the UNet whose output depends on the latents and on the timestep."""
    return 0.1 * x + torch.sin(torch.as_tensor(t, dtype=torch.float32) / 100)


def reference(scheduler_class: type, params: SolverParams, **config: Any) -> Any:
    """A diffusers scheduler configured like SD1.5's scheduler config, with our params' choices."""
    return scheduler_class(
        num_train_timesteps=params.num_train_timesteps,
        beta_start=params.initial_diffusion_rate,
        beta_end=params.final_diffusion_rate,
        beta_schedule=params.noise_schedule.value,
        timestep_spacing=params.timesteps_spacing.value,
        steps_offset=params.timesteps_offset,
        prediction_type=params.prediction_type.value,
        **config,
    )


def run_reference(
    scheduler: Any, num_steps: int, x: torch.Tensor, begin: int = 0, **step_kwargs: Any
) -> list[torch.Tensor]:
    """Latents after each step of diffusers' loop (as in its SD pipelines), from `begin` on."""
    generator = torch.Generator("cpu").manual_seed(SEED)
    trajectory = []
    for t in scheduler.timesteps[begin:]:
        eps = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
        trajectory.append(x)
    return trajectory


def run_solver(solver: Solver, x: torch.Tensor) -> list[torch.Tensor]:
    """Latents after each step of our loop (as our pipeline runs it)."""
    generator = torch.Generator("cpu").manual_seed(SEED)
    trajectory = []
    for step in solver.inference_steps:
        t = solver.timesteps[step]
        eps = fake_model(solver.scale_model_input(x, step), t)
        x = solver(x, predicted_noise=eps, step=step, generator=generator)
        trajectory.append(x)
    return trajectory


def initial_latents(scale: float | torch.Tensor) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(0)) * scale


def max_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    assert len(ours) == len(theirs)
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True))


def assert_same_timesteps(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal, except Euler's fractional Karras timesteps: those go through a float32 log and exp, where
    numpy's SIMD kernels and torch's differ by a few ulps depending on the CPU; measured max relative
    diff 1 ulp on an AMD EPYC (6.1e-5 at t~800), 4.2e-7 (6 ulps, 2.9e-6 at t~6.8) on an Intel Xeon."""
    assert ours.dtype == theirs.dtype
    if ours.is_floating_point() and not torch.equal(ours, ours.round()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    else:
        assert torch.equal(ours, theirs), (ours, theirs)


def assert_same_trajectory(solver: Solver, scheduler: Any, num_steps: int, **step_kwargs: Any) -> float:
    scheduler.set_timesteps(num_steps)
    assert_same_timesteps(solver.timesteps, scheduler.timesteps)
    assert solver.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-7)
    x = initial_latents(scheduler.init_noise_sigma)
    theirs = run_reference(scheduler, num_steps, x, **step_kwargs)
    ours = run_solver(solver, x)
    difference = max_difference(ours, theirs)
    check_parity("solvers", difference)
    return difference


SD15_DDIM = {"clip_sample": False, "set_alpha_to_one": False}


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
def test_ddim_matches_diffusers(spacing: TimestepSpacing, prediction: PredictionType) -> None:
    params = SolverParams(timesteps_spacing=spacing, prediction_type=prediction)
    assert_same_trajectory(DDIM(25, params=params), reference(DDIMScheduler, params, **SD15_DDIM), 25)


def test_ddim_with_eta_matches_diffusers() -> None:
    params = SolverParams()
    scheduler = reference(DDIMScheduler, params, **SD15_DDIM)
    assert_same_trajectory(DDIM(20, params=params, eta=0.7), scheduler, 20, eta=0.7)


def test_ddim_linear_noise_schedule_without_offset_matches_diffusers() -> None:
    params = SolverParams(timesteps_offset=0, noise_schedule=NoiseSchedule.LINEAR)
    assert_same_trajectory(DDIM(20, params=params), reference(DDIMScheduler, params, **SD15_DDIM), 20)


@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddpm_matches_diffusers(spacing: TimestepSpacing) -> None:
    params = SolverParams(timesteps_spacing=spacing)
    assert_same_trajectory(DDPM(25, params=params), reference(DDPMScheduler, params, clip_sample=False), 25)


def test_ddpm_v_prediction_matches_diffusers() -> None:
    params = SolverParams(prediction_type=PredictionType.V_PREDICTION)
    assert_same_trajectory(DDPM(20, params=params), reference(DDPMScheduler, params, clip_sample=False), 20)


def dpm_reference(params: SolverParams, algorithm: str) -> DPMSolverMultistepScheduler:
    return reference(
        DPMSolverMultistepScheduler,
        params,
        algorithm_type=algorithm,
        solver_order=2,
        use_karras_sigmas=params.sigma_schedule == KARRAS,
    )


@pytest.mark.parametrize("num_steps", [10, 25])
@pytest.mark.parametrize("sigmas", [None, KARRAS])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_solver_matches_diffusers(
    spacing: TimestepSpacing, sigmas: SigmaSchedule | None, num_steps: int
) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    assert_same_trajectory(
        DPMSolver(num_steps, params=params), dpm_reference(params, "dpmsolver++"), num_steps
    )


def test_dpm_solver_v_prediction_matches_diffusers() -> None:
    params = SolverParams(prediction_type=PredictionType.V_PREDICTION, sigma_schedule=KARRAS)
    assert_same_trajectory(DPMSolver(20, params=params), dpm_reference(params, "dpmsolver++"), 20)


@pytest.mark.parametrize("sigmas", [None, KARRAS])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpm_solver_sde_matches_diffusers(spacing: TimestepSpacing, sigmas: SigmaSchedule | None) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    assert_same_trajectory(DPMSolverSDE(20, params=params), dpm_reference(params, "sde-dpmsolver++"), 20)


def test_dpm_solver_is_second_order_after_the_first_step() -> None:
    """Differs from a first-order (DDIM-like) update, which a missing history would silently give."""
    params = SolverParams(sigma_schedule=KARRAS)
    scheduler = reference(DPMSolverMultistepScheduler, params, solver_order=1, use_karras_sigmas=True)
    scheduler.set_timesteps(20)
    x = initial_latents(1.0)
    first_order = run_reference(scheduler, 20, x)
    second_order = run_solver(DPMSolver(20, params=params), x)
    assert (first_order[0] - second_order[0]).abs().max() == 0  # first step is first order in both
    assert (first_order[5] - second_order[5]).abs().max() > 1e-3


def test_dpm_solver_history_never_leaks_between_runs() -> None:
    solver = DPMSolver(20)
    x = initial_latents(1.0)
    assert torch.equal(run_solver(solver, x)[-1], run_solver(solver, x)[-1])
    img2img = DPMSolver(20, first_inference_step=5)
    img2img(x, fake_model(x, img2img.timesteps[4]), 4)  # a stale prediction at the step just before the start
    assert torch.equal(run_solver(img2img, x)[-1], run_solver(img2img.rebuild(), x)[-1])


def euler_reference(params: SolverParams) -> EulerDiscreteScheduler:
    return reference(EulerDiscreteScheduler, params, use_karras_sigmas=params.sigma_schedule == KARRAS)


@pytest.mark.parametrize("sigmas", [None, KARRAS])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
def test_euler_matches_diffusers(
    spacing: TimestepSpacing, sigmas: SigmaSchedule | None, prediction: PredictionType
) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas, prediction_type=prediction)
    assert_same_trajectory(Euler(25, params=params), euler_reference(params), 25)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral_matches_diffusers(spacing: TimestepSpacing, prediction: PredictionType) -> None:
    params = SolverParams(timesteps_spacing=spacing, prediction_type=prediction)
    assert_same_trajectory(
        EulerAncestral(25, params=params), reference(EulerAncestralDiscreteScheduler, params), 25
    )


@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_ancestral_karras_matches_diffusers_rule_on_euler_karras_schedule(
    spacing: TimestepSpacing,
) -> None:
    """diffusers' Euler ancestral has no Karras option: its step rule runs on EulerDiscrete's Karras schedule."""
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=KARRAS)
    schedule = euler_reference(params)
    schedule.set_timesteps(20)
    scheduler = reference(EulerAncestralDiscreteScheduler, params)
    scheduler.set_timesteps(20)
    scheduler.timesteps, scheduler.sigmas = schedule.timesteps, schedule.sigmas
    solver = EulerAncestral(20, params=params)
    assert_same_timesteps(solver.timesteps, schedule.timesteps)
    x = initial_latents(schedule.init_noise_sigma)
    difference = max_difference(run_solver(solver, x), run_reference(scheduler, 20, x))
    check_parity("solvers", difference)


@pytest.mark.parametrize("num_steps", [4, 8, 25])
@pytest.mark.parametrize("prediction", ALL_PREDICTIONS)
def test_lcm_matches_diffusers(num_steps: int, prediction: PredictionType) -> None:
    params = SolverParams(prediction_type=prediction)
    scheduler = reference(LCMScheduler, params, **SD15_DDIM)
    assert_same_trajectory(LCM(num_steps, params=params), scheduler, num_steps)


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8])
def test_lcm_img2img_matches_diffusers_lcm_img2img_schedule(strength: float) -> None:
    """diffusers' LCM img2img pipeline: set_timesteps(strength=...), noise to timesteps[0], run every step."""
    params = SolverParams()
    scheduler = reference(LCMScheduler, params, **SD15_DDIM)
    scheduler.set_timesteps(4, strength=strength)
    solver = LCM(4, params=params, strength=strength)
    assert torch.equal(solver.timesteps, scheduler.timesteps)
    clean = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(2))
    start = scheduler.add_noise(clean, noise, scheduler.timesteps[:1])
    check_parity("solvers", max_difference([solver.add_noise(clean, noise, 0)], [start]))
    difference = max_difference(run_solver(solver, start), run_reference(scheduler, 4, start))
    check_parity("solvers", difference)


IMG2IMG_CASES = [
    (DDIM, SolverParams(), lambda p: reference(DDIMScheduler, p, **SD15_DDIM)),
    (
        DDPM,
        SolverParams(timesteps_spacing=TimestepSpacing.TRAILING),
        lambda p: reference(DDPMScheduler, p, clip_sample=False),
    ),
    (DPMSolver, SolverParams(sigma_schedule=KARRAS), lambda p: dpm_reference(p, "dpmsolver++")),
    (DPMSolverSDE, SolverParams(), lambda p: dpm_reference(p, "sde-dpmsolver++")),
    (Euler, SolverParams(sigma_schedule=KARRAS), euler_reference),
    (
        EulerAncestral,
        SolverParams(timesteps_spacing=TimestepSpacing.LINSPACE),
        lambda p: reference(EulerAncestralDiscreteScheduler, p),
    ),
    (LCM, SolverParams(), lambda p: reference(LCMScheduler, p, **SD15_DDIM)),
]


@pytest.mark.parametrize("strength", [0.3, 0.55, 0.8])
@pytest.mark.parametrize(
    "solver_class,params,make_scheduler",
    IMG2IMG_CASES,
    ids=[
        f"{c.__name__}-{p.timesteps_spacing.value}-{p.sigma_schedule.value if p.sigma_schedule else 'interpolated'}"
        for c, p, _ in IMG2IMG_CASES
    ],
)
def test_img2img_matches_diffusers_pipeline(
    solver_class: type[Solver], params: SolverParams, make_scheduler: Any, strength: float
) -> None:
    """Start step, remaining timesteps, noised latents and trajectory as StableDiffusionImg2ImgPipeline's."""
    num_steps = 20
    scheduler = make_scheduler(params)
    scheduler.set_timesteps(num_steps)
    # diffusers' own img2img start: get_timesteps of the SD img2img pipeline, run on our scheduler
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu"
    )
    solver = solver_class(num_steps, params=params)
    solver = solver.rebuild(first_inference_step=solver.first_step_from_strength(strength))
    assert_same_timesteps(solver.timesteps[solver.first_inference_step :], timesteps)

    clean = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(1))
    noise = torch.randn(SHAPE, generator=torch.Generator("cpu").manual_seed(2))
    theirs_start = scheduler.add_noise(clean, noise, timesteps[:1])
    ours_start = solver.add_noise(clean, noise, solver.first_inference_step)
    check_parity("solvers", (ours_start - theirs_start).abs().max())

    begin = num_steps - len(timesteps)
    difference = max_difference(
        run_solver(solver, ours_start), run_reference(scheduler, num_steps, theirs_start, begin)
    )
    check_parity("solvers", difference)


@pytest.mark.parametrize("num_steps", [1, 7, 20, 30, 50])
@pytest.mark.parametrize("strength", [0.0, 0.01, 0.3, 0.35, 0.55, 0.7, 0.99, 1.0])
def test_first_step_from_strength_matches_diffusers(num_steps: int, strength: float) -> None:
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(num_steps)
    timesteps, remaining = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu"
    )
    first = first_inference_step_from_strength(num_steps, strength)
    assert DDIM(num_steps).first_step_from_strength(strength) == first
    assert first == num_steps - remaining == num_steps - len(timesteps)


def test_inference_steps_and_rebuild() -> None:
    solver = EulerAncestral(30, first_inference_step=3, params=SolverParams(sigma_schedule=KARRAS))
    assert solver.inference_steps == range(3, 30)
    fewer = solver.rebuild(num_inference_steps=10, first_inference_step=0)
    assert type(fewer) is EulerAncestral and fewer.params is solver.params
    assert len(fewer.timesteps) == 10 and fewer.inference_steps == range(10)
    assert torch.equal(solver.rebuild().timesteps, solver.timesteps)
    lcm = LCM(4, original_inference_steps=40, strength=0.5).rebuild(num_inference_steps=6)
    assert lcm.original_inference_steps == 40 and lcm.strength == 0.5 and len(lcm.timesteps) == 6
    assert DDIM(20, eta=0.5).rebuild().eta == 0.5


def test_invalid_steps_are_refused() -> None:
    with pytest.raises(ValueError, match="first_inference_step"):
        DDIM(20, first_inference_step=21)
    with pytest.raises(ValueError, match="num_inference_steps"):
        Euler(0)
    with pytest.raises(ValueError, match="original_inference_steps"):
        LCM(60)
    with pytest.raises(ValueError, match="strength"):
        LCM(30, strength=0.5)
    with pytest.raises(ValueError, match="strength"):
        first_inference_step_from_strength(20, 1.5)


def test_to_moves_and_casts_the_schedule() -> None:
    solver = DPMSolver(20).to(dtype=torch.float64)
    assert solver.sigmas.dtype == torch.float64 and solver.timesteps.dtype == torch.int64
    x = initial_latents(1.0).double()
    out = solver(x, fake_model(x, solver.timesteps[0]).double(), 0)
    assert out.dtype == torch.float64
