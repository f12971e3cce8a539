"""Diffusion solvers (samplers) for Stable Diffusion, numerically equal to diffusers' schedulers."""

from .ddim import DDIM
from .ddpm import DDPM
from .dpm_solver import DPMSolver, DPMSolverSDE
from .euler import Euler, EulerAncestral
from .lcm import LCM
from .registry import SCHEDULES, SOLVERS, make_solver
from .solver import (
    NoiseSchedule,
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
    first_inference_step_from_strength,
)

__all__ = [
    "DDIM",
    "DDPM",
    "DPMSolver",
    "DPMSolverSDE",
    "Euler",
    "EulerAncestral",
    "LCM",
    "SCHEDULES",
    "SOLVERS",
    "NoiseSchedule",
    "PredictionType",
    "SigmaSchedule",
    "Solver",
    "SolverParams",
    "TimestepSpacing",
    "first_inference_step_from_strength",
    "make_solver",
]
