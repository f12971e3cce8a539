"""Heun, LMS, DPM++ SDE, DPM++ 2M SDE (heun), UniPC, DEIS and the sigma schedules against diffusers' schedulers.

Same fake model as test_solvers.py (its output depends on the latents and the timestep). diffusers' two-stage
schedulers (Heun, DPMSolverSDE) take 2n - 1 `step` calls for n steps: their latents are compared after each
completed step. Where this venv lacks what diffusers imports for a scheduler, only that piece is stood in for:
scipy's `integrate.quad` (LMS coefficients) by Gauss-Legendre quadrature, exact for these polynomials; scipy's
`beta.ppf` (beta sigmas) by our quantile function (itself checked against scipy in test_solvers_comfyui.py);
torchsde (DPMSolverSDE's Brownian tree) by a zero noise source, with s_noise = 0 on both sides.

Our step coefficients are Python floats (float64) where diffusers computes them in float32 tensors, so
trajectories differ by float32 rounding: measured (torch 2.13 CPU, diffusers 0.39) at most 4.5e-6 of the
latents' magnitude over 144 trajectories (VE latents reach ~15, VP ones ~3). Tolerance: 2e-5 of the
magnitude (see `assert_close`).
"""

from __future__ import annotations

import inspect
import math
import sys
import types
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    StableDiffusionImg2ImgPipeline,
    UniPCMultistepScheduler,
)

from foundationals.latent_diffusion.solvers import (
    DDIM,
    DDPM,
    DEIS,
    LCM,
    LMS,
    SCHEDULES,
    SOLVERS,
    DPMPlusPlus2SAncestral,
    DPMPlusPlusSDE,
    DPMSolver,
    DPMSolver3MSDE,
    DPMSolverSDE,
    Euler,
    EulerAncestral,
    Heun,
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
    UniPC,
    make_solver,
)
from foundationals.latent_diffusion.solvers.schedules import beta_quantile
from tests.foundationals.latent_diffusion.test_solvers import SD15_DDIM, fake_model, initial_latents
from tests.support.parity import check_parity

pytestmark = [
    pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
    pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context"),
]

SEED = 12
SPACINGS = list(TimestepSpacing)
PREDICTIONS = [PredictionType.EPSILON, PredictionType.V_PREDICTION]
KARRAS, EXPONENTIAL, BETA_SIGMAS = SigmaSchedule.KARRAS, SigmaSchedule.EXPONENTIAL, SigmaSchedule.BETA_SIGMAS
DIFFUSERS_SIGMAS = [None, KARRAS, EXPONENTIAL]


def reference(scheduler_class: type, params: SolverParams, **config: Any) -> Any:
    """A diffusers scheduler configured like SD1.5's scheduler config, with our params' choices."""
    schedule = params.sigma_schedule
    options = {
        "use_karras_sigmas": schedule == KARRAS,
        "use_exponential_sigmas": schedule == EXPONENTIAL,
        "use_beta_sigmas": schedule == BETA_SIGMAS,
        "rescale_betas_zero_snr": params.rescale_betas_zero_snr,
    }
    accepted = inspect.signature(scheduler_class.__init__).parameters
    return scheduler_class(
        num_train_timesteps=params.num_train_timesteps,
        beta_start=params.initial_diffusion_rate,
        beta_end=params.final_diffusion_rate,
        beta_schedule=params.noise_schedule.value,
        timestep_spacing=params.timesteps_spacing.value,
        steps_offset=params.timesteps_offset,
        prediction_type=params.prediction_type.value,
        **{key: value for key, value in options.items() if value or key in accepted},
        **config,
    )


def run_reference(scheduler: Any, x: torch.Tensor, begin: int = 0, **step_kwargs: Any) -> list[torch.Tensor]:
    """Latents after each completed step of diffusers' loop (two `step` calls per step for two-stage ones)."""
    generator = torch.Generator("cpu").manual_seed(SEED)
    trajectory = []
    kwargs = dict(step_kwargs)
    if "generator" in scheduler.step.__code__.co_varnames:
        kwargs["generator"] = generator
    for t in scheduler.timesteps[begin:]:
        eps = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
        if getattr(scheduler, "state_in_first_order", True):
            trajectory.append(x)
    if not getattr(scheduler, "state_in_first_order", True):
        trajectory.append(x)  # Heun's last step is a first-order (Euler) one
    return trajectory


def run_ours(solver: Solver, x: torch.Tensor, model: Any = fake_model) -> list[torch.Tensor]:
    """Latents after each step of our loop, the model passed as `evaluate` for extra evaluations."""
    generator = torch.Generator("cpu").manual_seed(SEED)
    trajectory = []
    for step in solver.inference_steps:
        prediction = model(solver.scale_model_input(x, step), solver.timesteps[step])
        x = solver(x, prediction, step, generator=generator, evaluate=model)
        trajectory.append(x)
    return trajectory


def relative_difference(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    """Max abs difference over the trajectory, relative to the largest magnitude of the reference's latents."""
    assert len(ours) == len(theirs), (len(ours), len(theirs))
    scale = max(1.0, max(t.abs().max().item() for t in theirs))
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs, strict=True)) / scale


def assert_close(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> float:
    assert all(torch.isfinite(t).all() for t in ours)
    difference = relative_difference(ours, theirs)
    check_parity("solvers_new", difference)  # relative to the latents' magnitude
    return difference


def assert_same_schedule(solver: Solver, scheduler: Any, stages: int = 1) -> None:
    """The timesteps of each step's first evaluation, the sigmas and the initial noise scale as diffusers'."""
    theirs = scheduler.timesteps if stages == 1 else scheduler.timesteps[::2]
    ours = solver.timesteps
    assert len(ours) == len(theirs)
    if ours.is_floating_point():
        torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(ours, theirs.long()), (ours, theirs)
    their_sigmas = (
        scheduler.sigmas if stages == 1 else torch.cat([scheduler.sigmas[::2], scheduler.sigmas[-1:]])
    )
    torch.testing.assert_close(solver.sigmas.double(), their_sigmas.double(), rtol=1e-6, atol=1e-7)
    assert solver.init_noise_sigma == pytest.approx(float(scheduler.init_noise_sigma), rel=1e-6)


def compare(solver: Solver, scheduler: Any, num_steps: int, stages: int = 1, **step_kwargs: Any) -> float:
    scheduler.set_timesteps(num_steps)
    assert_same_schedule(solver, scheduler, stages)
    x = initial_latents(float(scheduler.init_noise_sigma))
    return assert_close(run_ours(solver, x), run_reference(scheduler, x, **step_kwargs))


# -- Heun ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", DIFFUSERS_SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_heun_matches_diffusers(spacing: TimestepSpacing, sigmas: SigmaSchedule | None) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    compare(Heun(12, params=params), reference(HeunDiscreteScheduler, params), 12, stages=2)


@pytest.mark.parametrize("prediction", list(PredictionType))
def test_heun_predictions_match_diffusers(prediction: PredictionType) -> None:
    params = SolverParams(prediction_type=prediction, sigma_schedule=KARRAS)
    compare(Heun(10, params=params), reference(HeunDiscreteScheduler, params), 10, stages=2)


def test_heun_evaluates_the_model_twice_per_step_but_the_last() -> None:
    solver = Heun(7)
    calls: list[float] = []

    def counting(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(float(t))
        return fake_model(x, t)

    run_ours(solver, initial_latents(solver.init_noise_sigma), counting)
    scheduler = reference(HeunDiscreteScheduler, SolverParams())
    scheduler.set_timesteps(7)
    assert len(calls) == 2 * 7 - 1 == len(scheduler.timesteps)
    assert calls == pytest.approx(scheduler.timesteps.tolist(), rel=1e-6)


def test_two_stage_solvers_need_the_model_function() -> None:
    for solver in (Heun(5), DPMPlusPlusSDE(5), DPMPlusPlus2SAncestral(5)):
        x = initial_latents(1.0)
        with pytest.raises(ValueError, match="evaluate"):
            solver(x, fake_model(x, solver.timesteps[0]), 0)


# -- LMS ----------------------------------------------------------------------------------------------------


def _gauss_legendre_quad(function: Any, start: Any, end: Any, **_: Any) -> tuple[float, float]:
    """scipy.integrate.quad's answer for the polynomials LMS integrates (degree <= 3): 8-point Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(8)
    start, end = float(start), float(end)
    middle, half = (start + end) / 2, (end - start) / 2
    return half * sum(w * float(function(middle + half * n)) for n, w in zip(nodes, weights)), 0.0


@pytest.fixture
def lms_scheduler(monkeypatch: pytest.MonkeyPatch) -> type:
    from diffusers.schedulers import scheduling_lms_discrete

    monkeypatch.setattr(
        scheduling_lms_discrete, "integrate", SimpleNamespace(quad=_gauss_legendre_quad), raising=False
    )
    return scheduling_lms_discrete.LMSDiscreteScheduler


@pytest.mark.parametrize("sigmas", DIFFUSERS_SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_lms_matches_diffusers(
    lms_scheduler: type, spacing: TimestepSpacing, sigmas: SigmaSchedule | None
) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    compare(LMS(15, params=params), reference(lms_scheduler, params), 15)


@pytest.mark.parametrize("prediction", list(PredictionType))
def test_lms_predictions_and_orders_match_diffusers(lms_scheduler: type, prediction: PredictionType) -> None:
    params = SolverParams(prediction_type=prediction)
    for order in (2, 3):
        compare(LMS(12, params=params, order=order), reference(lms_scheduler, params), 12, order=order)


# -- DPM++ SDE (deterministic part) -------------------------------------------------------------------------


class _ZeroBrownianInterval:
    """Stands in for torchsde.BrownianInterval: zero increments (the tests run with s_noise = 0)."""

    def __init__(self, t0: float, t1: float, size: tuple[int, ...], dtype: torch.dtype, **_: Any) -> None:
        self.size, self.dtype = size, dtype

    def __call__(self, t0: float, t1: float) -> torch.Tensor:
        return torch.zeros(self.size, dtype=self.dtype)


@pytest.fixture
def sde_scheduler(monkeypatch: pytest.MonkeyPatch) -> type:
    torchsde = sys.modules.get("torchsde")
    if torchsde is None:
        stub = types.ModuleType("torchsde")
        stub.BrownianInterval = _ZeroBrownianInterval  # type: ignore[attr-defined]
        monkeypatch.setitem(sys.modules, "torchsde", stub)
        monkeypatch.delitem(sys.modules, "diffusers.schedulers.scheduling_dpmsolver_sde", raising=False)
    from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler

    return DPMSolverSDEScheduler


def _run_sde_reference(scheduler: Any, x: torch.Tensor) -> list[torch.Tensor]:
    trajectory = []
    for t in scheduler.timesteps:
        eps = fake_model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(eps, t, x, s_noise=0.0).prev_sample
        if scheduler.state_in_first_order:
            trajectory.append(x)
    return trajectory


@pytest.mark.parametrize("sigmas", DIFFUSERS_SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpmpp_sde_without_noise_matches_diffusers(
    sde_scheduler: type, spacing: TimestepSpacing, sigmas: SigmaSchedule | None
) -> None:
    """s_noise = 0: the ancestral steps' deterministic drift (to sigma_down), midpoint evaluations included."""
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    scheduler = reference(sde_scheduler, params)
    scheduler.set_timesteps(10)
    solver = DPMPlusPlusSDE(10, params=params, s_noise=0.0)
    assert_same_schedule(solver, scheduler, stages=2)
    torch.testing.assert_close(
        solver.midpoint_timesteps[:-1].double(), scheduler.timesteps[1::2].double(), rtol=1e-6, atol=1e-4
    )
    x = initial_latents(float(scheduler.init_noise_sigma))
    assert_close(run_ours(solver, x), _run_sde_reference(scheduler, x))


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_dpmpp_sde_v_prediction_without_noise_matches_diffusers(
    sde_scheduler: type, prediction: PredictionType
) -> None:
    params = SolverParams(prediction_type=prediction, sigma_schedule=KARRAS)
    scheduler = reference(sde_scheduler, params)
    scheduler.set_timesteps(8)
    x = initial_latents(float(scheduler.init_noise_sigma))
    assert_close(run_ours(DPMPlusPlusSDE(8, params=params, s_noise=0.0), x), _run_sde_reference(scheduler, x))


def test_dpmpp_sde_noise_is_a_brownian_path_from_the_generator() -> None:
    """Its noise differs from the noiseless run by the two increments it draws per step (none on the last)."""
    solver = DPMPlusPlusSDE(6)
    x = initial_latents(solver.init_noise_sigma)
    noisy, calm = run_ours(solver, x), run_ours(DPMPlusPlusSDE(6, s_noise=0.0), x)
    assert (noisy[0] - calm[0]).abs().max() > 1e-2
    assert torch.equal(run_ours(solver, x)[-1], noisy[-1])  # the same generator seed, the same draws


# -- DPM++ 2M SDE heun --------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigmas", [None, KARRAS])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_dpmpp_2m_sde_heun_matches_diffusers(spacing: TimestepSpacing, sigmas: SigmaSchedule | None) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    scheduler = reference(
        DPMSolverMultistepScheduler,
        params,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        solver_type="heun",
    )
    compare(DPMSolverSDE(15, params=params, solver_type="heun"), scheduler, 15)


def test_dpmpp_2m_heun_ode_matches_diffusers() -> None:
    params = SolverParams(sigma_schedule=KARRAS)
    scheduler = reference(DPMSolverMultistepScheduler, params, solver_order=2, solver_type="heun")
    compare(DPMSolver(15, params=params, solver_type="heun"), scheduler, 15)


@pytest.mark.parametrize("sigmas", [EXPONENTIAL, BETA_SIGMAS])
def test_dpm_solver_exponential_and_beta_sigmas_match_diffusers(
    sigmas: SigmaSchedule, stub_beta_ppf: None
) -> None:
    params = SolverParams(sigma_schedule=sigmas)
    compare(DPMSolver(12, params=params), reference(DPMSolverMultistepScheduler, params, solver_order=2), 12)


# -- UniPC --------------------------------------------------------------------------------------------------


def unipc_reference(params: SolverParams, variant: str, order: int) -> UniPCMultistepScheduler:
    return reference(UniPCMultistepScheduler, params, solver_type=variant, solver_order=order)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("sigmas", DIFFUSERS_SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_unipc_bh2_matches_diffusers(
    spacing: TimestepSpacing, sigmas: SigmaSchedule | None, order: int
) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    compare(UniPC(12, params=params, variant="bh2", order=order), unipc_reference(params, "bh2", order), 12)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("sigmas", [None, KARRAS])
def test_unipc_bh1_matches_diffusers_until_its_nan_last_step(
    sigmas: SigmaSchedule | None, order: int
) -> None:
    """diffusers' bh1 ends in NaN (B(h) = h = -inf times a zero correction on the step to sigma 0); ours ends at
    the data prediction of the last model output, which is what every other step formula gives there."""
    params = SolverParams(sigma_schedule=sigmas)
    scheduler = unipc_reference(params, "bh1", order)
    scheduler.set_timesteps(12)
    x = initial_latents(1.0)
    theirs = run_reference(scheduler, x)
    assert torch.isnan(theirs[-1]).all()
    ours = run_ours(UniPC(12, params=params, variant="bh1", order=order), x)
    assert_close(ours[:-1], theirs[:-1])
    last_sigma = float(scheduler.sigmas[-2])
    alpha, sigma = 1 / math.sqrt(last_sigma**2 + 1), last_sigma / math.sqrt(last_sigma**2 + 1)
    expected = (ours[-2] - sigma * fake_model(ours[-2], scheduler.timesteps[-1])) / alpha
    torch.testing.assert_close(ours[-1], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("prediction", list(PredictionType))
def test_unipc_predictions_match_diffusers(prediction: PredictionType) -> None:
    params = SolverParams(prediction_type=prediction, timesteps_spacing=TimestepSpacing.TRAILING)
    compare(UniPC(10, params=params, variant="bh2", order=3), unipc_reference(params, "bh2", 3), 10)


# -- DEIS ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_steps", [8, 20])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("sigmas", DIFFUSERS_SIGMAS)
@pytest.mark.parametrize("spacing", SPACINGS)
def test_deis_matches_diffusers(
    spacing: TimestepSpacing, sigmas: SigmaSchedule | None, order: int, num_steps: int
) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    scheduler = reference(DEISMultistepScheduler, params, solver_order=order)
    compare(DEIS(num_steps, params=params, order=order), scheduler, num_steps)


@pytest.mark.parametrize("prediction", list(PredictionType))
def test_deis_predictions_match_diffusers(prediction: PredictionType) -> None:
    params = SolverParams(prediction_type=prediction)
    compare(DEIS(10, params=params, order=3), reference(DEISMultistepScheduler, params, solver_order=3), 10)


# -- Exponential and beta sigmas on the Euler family ----------------------------------------------------------


@pytest.fixture
def stub_beta_ppf(monkeypatch: pytest.MonkeyPatch) -> None:
    """scipy.stats.beta.ppf for diffusers' `use_beta_sigmas`, by our quantile function."""
    from diffusers.schedulers import (
        scheduling_dpmsolver_multistep,
        scheduling_euler_discrete,
        scheduling_heun_discrete,
    )

    stats = SimpleNamespace(stats=SimpleNamespace(beta=SimpleNamespace(ppf=beta_quantile)))
    for module in (scheduling_euler_discrete, scheduling_dpmsolver_multistep, scheduling_heun_discrete):
        monkeypatch.setattr(module, "scipy", stats, raising=False)
        monkeypatch.setattr(module, "is_scipy_available", lambda: True)


@pytest.mark.parametrize("sigmas", [EXPONENTIAL, BETA_SIGMAS])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_euler_exponential_and_beta_sigmas_match_diffusers(
    stub_beta_ppf: None, spacing: TimestepSpacing, sigmas: SigmaSchedule
) -> None:
    params = SolverParams(timesteps_spacing=spacing, sigma_schedule=sigmas)
    compare(Euler(12, params=params), reference(EulerDiscreteScheduler, params), 12)


def test_heun_beta_sigmas_match_diffusers(stub_beta_ppf: None) -> None:
    params = SolverParams(sigma_schedule=BETA_SIGMAS, timesteps_spacing=TimestepSpacing.TRAILING)
    compare(Heun(9, params=params), reference(HeunDiscreteScheduler, params), 9, stages=2)


# -- v-prediction with zero terminal SNR ----------------------------------------------------------------------

ZSNR_V = SolverParams(
    prediction_type=PredictionType.V_PREDICTION,
    rescale_betas_zero_snr=True,
    timesteps_spacing=TimestepSpacing.TRAILING,
)


@pytest.mark.parametrize(
    "solver,scheduler",
    [
        (lambda p: DDIM(15, params=p), lambda p: reference(DDIMScheduler, p, **SD15_DDIM)),
        (lambda p: DDPM(15, params=p), lambda p: reference(DDPMScheduler, p, clip_sample=False)),
        (lambda p: Euler(15, params=p), lambda p: reference(EulerDiscreteScheduler, p)),
        (lambda p: EulerAncestral(15, params=p), lambda p: reference(EulerAncestralDiscreteScheduler, p)),
        (
            lambda p: DPMSolver(15, params=p),
            lambda p: reference(DPMSolverMultistepScheduler, p, solver_order=2),
        ),
        (
            lambda p: DPMSolverSDE(15, params=p),
            lambda p: reference(
                DPMSolverMultistepScheduler, p, algorithm_type="sde-dpmsolver++", solver_order=2
            ),
        ),
        (lambda p: UniPC(15, params=p, variant="bh2"), lambda p: unipc_reference(p, "bh2", 2)),
        (lambda p: LCM(4, params=p), lambda p: reference(LCMScheduler, p, **SD15_DDIM)),
    ],
    ids=["ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc_bh2", "lcm"],
)
@pytest.mark.parametrize("spacing", [TimestepSpacing.TRAILING, TimestepSpacing.LEADING])
def test_zero_terminal_snr_v_prediction_matches_diffusers(
    solver: Any, scheduler: Any, spacing: TimestepSpacing
) -> None:
    """diffusers' rescale_betas_zero_snr=True (sigma-based schedulers clamp the last alpha_bar to 2^-24)."""
    params = SolverParams(
        prediction_type=PredictionType.V_PREDICTION, rescale_betas_zero_snr=True, timesteps_spacing=spacing
    )
    ours, theirs = solver(params), scheduler(params)
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, rtol=0, atol=0)
    theirs.set_timesteps(ours.num_inference_steps)
    x = initial_latents(float(theirs.init_noise_sigma))
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=1e-6)
    assert_close(run_ours(ours, x), run_reference(theirs, x))


def test_zero_terminal_snr_schedule_reaches_pure_noise() -> None:
    ddim, euler = DDIM(10, params=ZSNR_V), Euler(10, params=ZSNR_V)
    assert ddim.alphas_cumprod[-1] == 0 and euler.alphas_cumprod[-1] == 2.0**-24
    assert euler.sigmas[0] == pytest.approx(4096.0, rel=1e-6)
    for name in SOLVERS:
        if name == "lcm":
            continue
        solver = make_solver(
            name, 10, "trailing", prediction_type=PredictionType.V_PREDICTION, zero_terminal_snr=True
        )
        x = initial_latents(solver.init_noise_sigma)
        assert torch.isfinite(run_ours(solver, x)[-1]).all(), name


def test_epsilon_models_with_zero_terminal_snr_are_refused_where_alpha_bar_is_zero() -> None:
    """DDIM, DDPM and LCM use alpha_bar = 0 itself at t = 999 (as diffusers, which gives NaN there)."""
    for name in ("ddim", "ddpm", "lcm"):
        with pytest.raises(ValueError, match="epsilon-prediction model with zero terminal SNR"):
            make_solver(name, 10, "trailing", zero_terminal_snr=True)
    assert make_solver("ddim", 20, "normal", zero_terminal_snr=True).timesteps[0] == 951  # never reaches 999
    assert torch.isfinite(make_solver("euler", 10, "trailing", zero_terminal_snr=True).sigmas).all()


# -- img2img ------------------------------------------------------------------------------------------------

IMG2IMG_CASES = [
    (
        lambda p: Heun(20, params=p),
        lambda p: reference(HeunDiscreteScheduler, p),
        SolverParams(sigma_schedule=KARRAS),
    ),
    (
        lambda p: UniPC(20, params=p, variant="bh2", order=3),
        lambda p: unipc_reference(p, "bh2", 3),
        SolverParams(),
    ),
    (lambda p: DEIS(20, params=p, order=2), lambda p: reference(DEISMultistepScheduler, p), SolverParams()),
    (
        lambda p: DPMSolverSDE(20, params=p, solver_type="heun"),
        lambda p: reference(
            DPMSolverMultistepScheduler, p, algorithm_type="sde-dpmsolver++", solver_type="heun"
        ),
        SolverParams(sigma_schedule=KARRAS),
    ),
]


@pytest.mark.parametrize("strength", [0.35, 0.7])
@pytest.mark.parametrize("case", IMG2IMG_CASES, ids=["heun", "uni_pc_bh2", "deis", "dpmpp_2m_sde_heun"])
def test_img2img_matches_diffusers_pipeline(case: Any, strength: float) -> None:
    make_ours, make_theirs, params = case
    num_steps = 20
    scheduler = make_theirs(params)
    scheduler.set_timesteps(num_steps)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), num_steps, strength, "cpu"
    )
    solver = make_ours(params)
    solver = solver.rebuild(first_inference_step=solver.first_step_from_strength(strength))
    clean = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(1))
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(2))
    start = scheduler.add_noise(clean, noise, timesteps[:1])
    torch.testing.assert_close(
        solver.add_noise(clean, noise, solver.first_inference_step), start, rtol=1e-5, atol=1e-5
    )
    begin = len(scheduler.timesteps) - len(timesteps)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin)
    assert_close(run_ours(solver, start), run_reference(scheduler, start, begin))


# -- No host synchronisation in the step loop ------------------------------------------------------------------

NEW_SOLVERS = [
    "heun",
    "dpmpp_2s_ancestral",
    "dpmpp_sde",
    "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde",
    "uni_pc",
    "uni_pc_bh2",
    "deis",
    "lms",
]


@pytest.mark.parametrize("schedule", ["normal", "karras", "align_your_steps"])
@pytest.mark.parametrize("name", NEW_SOLVERS + ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde"])
def test_steps_never_read_values_back_from_the_device(name: str, schedule: str) -> None:
    """On the meta device any .item() / float() of a tensor raises: the steps keep to device tensors and floats."""
    solver = make_solver(name, 6, schedule).to("meta")
    x = torch.empty((1, 4, 8, 8), device="meta")

    def model(model_input: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        assert timestep.device.type == "meta"
        return torch.empty_like(model_input)

    for step in solver.inference_steps:
        x = solver(x, model(solver.scale_model_input(x, step), solver.timesteps[step]), step, evaluate=model)
    assert x.device.type == "meta"


def test_registry_names_follow_comfyui() -> None:
    assert set(NEW_SOLVERS) <= set(SOLVERS)
    assert list(SOLVERS)[:7] == [
        "ddim",
        "ddpm",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "euler",
        "euler_ancestral",
        "lcm",
    ]
    assert list(SCHEDULES)[:4] == ["normal", "karras", "trailing", "linspace"]
    assert {"exponential", "sgm_uniform", "simple", "beta", "align_your_steps"} <= set(SCHEDULES)
    assert make_solver("uni_pc", 5).variant == "bh1" and make_solver("uni_pc_bh2", 5).variant == "bh2"
    assert make_solver("dpmpp_2m_sde_heun", 5).solver_type == "heun"
    assert make_solver("dpmpp_2m_sde", 5).solver_type == "midpoint"
    assert isinstance(make_solver("dpmpp_3m_sde", 5), DPMSolver3MSDE)
    sd15, sdxl = (
        make_solver("euler", 10, "align_your_steps"),
        make_solver("euler", 10, "align_your_steps", sdxl=True),
    )
    assert (
        sd15.params.sigma_schedule == SigmaSchedule.AYS_SD15
        and sdxl.params.sigma_schedule == SigmaSchedule.AYS_SDXL
    )
    with pytest.raises(ValueError, match="sigma-based solver"):
        make_solver("ddim", 10, "sgm_uniform")
    with pytest.raises(ValueError, match="unknown schedule"):
        make_solver("euler", 10, "ays")
