"""The solvers by the names the sampler node lists (ComfyUI's spelling), and the schedules they can run with."""

from __future__ import annotations

from typing import Any

import torch

from .ddim import DDIM
from .ddpm import DDPM
from .deis import DEIS
from .dpm_solver import DPMSolver, DPMSolver3MSDE, DPMSolverSDE
from .dpmpp_singlestep import DPMPlusPlus2SAncestral, DPMPlusPlusSDE
from .euler import Euler, EulerAncestral
from .heun import Heun
from .lcm import LCM
from .lms import LMS
from .multistep import MultistepSolver
from .sigma_solver import SigmaSolver
from .solver import PredictionType, SigmaSchedule, Solver, SolverParams, TimestepSpacing
from .unipc import UniPC

SOLVERS: dict[str, type[Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "dpmpp_2m": DPMSolver,
    "dpmpp_2m_sde": DPMSolverSDE,
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "lcm": LCM,
    "heun": Heun,
    "dpmpp_2s_ancestral": DPMPlusPlus2SAncestral,
    "dpmpp_sde": DPMPlusPlusSDE,
    "dpmpp_2m_sde_heun": DPMSolverSDE,
    "dpmpp_3m_sde": DPMSolver3MSDE,
    "uni_pc": UniPC,
    "uni_pc_bh2": UniPC,
    "deis": DEIS,
    "lms": LMS,
}
"""Solver names as the sampler node lists them (new names are appended: saved workflows store the name)."""

SOLVER_OPTIONS: dict[str, dict[str, Any]] = {
    "dpmpp_2m_sde_heun": {"solver_type": "heun"},
    "uni_pc": {"variant": "bh1"},
    "uni_pc_bh2": {"variant": "bh2"},
}
"""Constructor arguments of the names that are variants of one solver class."""

SCHEDULES: tuple[str, ...] = (
    "normal",
    "karras",
    "trailing",
    "linspace",
    "exponential",
    "sgm_uniform",
    "simple",
    "beta",
    "align_your_steps",
)
"""`normal` is the models' own (leading) spacing, `trailing` and `linspace` other spacings of the training
timesteps; the others are noise-level schedules for sigma-based solvers: `karras` and `exponential` as
diffusers converts them, `sgm_uniform`, `simple`, `beta` as ComfyUI defines them, `align_your_steps` NVIDIA's
SD1.5 or SDXL table (by the model)."""

_SPACINGS = {"trailing": TimestepSpacing.TRAILING, "linspace": TimestepSpacing.LINSPACE}
_SIGMA_SCHEDULES = {
    "karras": SigmaSchedule.KARRAS,
    "exponential": SigmaSchedule.EXPONENTIAL,
    "sgm_uniform": SigmaSchedule.SGM_UNIFORM,
    "simple": SigmaSchedule.SIMPLE,
    "beta": SigmaSchedule.BETA,
}


def sigma_schedule(schedule: str, sdxl: bool = False) -> SigmaSchedule | None:
    """The noise-level schedule a schedule name stands for (None for the timestep spacings)."""
    if schedule == "align_your_steps":
        return SigmaSchedule.AYS_SDXL if sdxl else SigmaSchedule.AYS_SD15
    return _SIGMA_SCHEDULES.get(schedule)


def supports_sigma_schedules(name: str) -> bool:
    """Whether the solver of that name runs on noise levels (so every schedule), not only timestep spacings."""
    return issubclass(SOLVERS[name], (SigmaSolver, MultistepSolver))


def make_solver(
    name: str,
    steps: int,
    schedule: str = "normal",
    denoise_strength: float = 1.0,
    prediction_type: PredictionType = PredictionType.EPSILON,
    device: torch.device | str = "cpu",
    zero_terminal_snr: bool = False,
    sdxl: bool = False,
) -> Solver:
    """A solver by name, with the schedule's spacing, starting where `denoise_strength` says (1 = all steps).

    `zero_terminal_snr` rescales the training noise schedule to zero terminal SNR (diffusers'
    `rescale_betas_zero_snr`); `sdxl` picks the SDXL Align-Your-Steps table.
    """
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    sigmas = sigma_schedule(schedule, sdxl)
    if sigmas is not None and not supports_sigma_schedules(name):
        sigma_based = ", ".join(candidate for candidate in SOLVERS if supports_sigma_schedules(candidate))
        raise ValueError(
            f"the {schedule} schedule needs a sigma-based solver ({sigma_based}), not {name}; "
            f"{name} runs with the normal, trailing or linspace schedules"
        )
    params = SolverParams(
        timesteps_spacing=_SPACINGS.get(schedule, TimestepSpacing.LEADING),
        sigma_schedule=sigmas,
        prediction_type=PredictionType(prediction_type),
        rescale_betas_zero_snr=zero_terminal_snr,
    )
    solver = SOLVERS[name](
        num_inference_steps=steps, params=params, device=device, **SOLVER_OPTIONS.get(name, {})
    )
    if denoise_strength < 1.0:
        solver = solver.rebuild(first_inference_step=solver.first_step_from_strength(denoise_strength))
    return solver
