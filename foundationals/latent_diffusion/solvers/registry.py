"""The solvers by the names the sampler node lists, and the schedules (spacings) they can run with."""

from __future__ import annotations

import torch

from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolver, DPMSolverSDE
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .solver import PredictionType, SigmaSchedule, Solver, SolverParams, TimestepSpacing

SOLVERS: dict[str, type[Solver]] = {
    "ddim": DDIM,
    "ddpm": DDPM,
    "dpmpp_2m": DPMSolver,
    "dpmpp_2m_sde": DPMSolverSDE,
    "euler": Euler,
    "euler_ancestral": EulerAncestral,
    "lcm": LCM,
}
"""Solver names as the sampler node lists them."""

SCHEDULES: tuple[str, ...] = ("normal", "karras", "trailing", "linspace")
"""`normal` is the models' own (leading) spacing; `karras` uses Karras sigmas where the solver has sigmas."""

_SIGMA_SOLVERS = (DPMSolver, DPMSolverSDE, Euler, EulerAncestral)


def make_solver(
    name: str,
    steps: int,
    schedule: str = "normal",
    denoise_strength: float = 1.0,
    prediction_type: PredictionType = PredictionType.EPSILON,
    device: torch.device | str = "cpu",
) -> Solver:
    """A solver by name, with the schedule's spacing, starting where `denoise_strength` says (1 = all steps)."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {', '.join(SOLVERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    solver_class = SOLVERS[name]
    if schedule == "karras" and not issubclass(solver_class, _SIGMA_SOLVERS):
        raise ValueError(
            f"the karras schedule needs a sigma-based solver (dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral), not {name}"
        )
    spacing = {"trailing": TimestepSpacing.TRAILING, "linspace": TimestepSpacing.LINSPACE}.get(
        schedule, TimestepSpacing.LEADING
    )
    params = SolverParams(
        timesteps_spacing=spacing,
        sigma_schedule=SigmaSchedule.KARRAS if schedule == "karras" else None,
        prediction_type=prediction_type,
    )
    solver = solver_class(num_inference_steps=steps, params=params, device=device)
    if denoise_strength < 1.0:
        solver = solver.rebuild(first_inference_step=solver.first_step_from_strength(denoise_strength))
    return solver
