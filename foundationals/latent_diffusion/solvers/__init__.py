"""Diffusion solvers (samplers) for Stable Diffusion, numerically equal to diffusers' schedulers (or, where
diffusers has none, ComfyUI's k-diffusion samplers)."""

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
from .registry import (
    SCHEDULES,
    SOLVER_OPTIONS,
    SOLVERS,
    make_solver,
    sigma_schedule,
    supports_sigma_schedules,
)
from .sigma_solver import SigmaSolver
from .solver import (
    Evaluate,
    NoiseSchedule,
    PredictionType,
    SigmaSchedule,
    Solver,
    SolverParams,
    TimestepSpacing,
    first_inference_step_from_strength,
)
from .unipc import UniPC

__all__ = [
    "DDIM",
    "DDPM",
    "DEIS",
    "DPMPlusPlus2SAncestral",
    "DPMPlusPlusSDE",
    "DPMSolver",
    "DPMSolver3MSDE",
    "DPMSolverSDE",
    "Euler",
    "EulerAncestral",
    "Heun",
    "LCM",
    "LMS",
    "SCHEDULES",
    "SOLVERS",
    "SOLVER_OPTIONS",
    "Evaluate",
    "MultistepSolver",
    "NoiseSchedule",
    "PredictionType",
    "SigmaSchedule",
    "SigmaSolver",
    "Solver",
    "SolverParams",
    "TimestepSpacing",
    "UniPC",
    "first_inference_step_from_strength",
    "make_solver",
    "sigma_schedule",
    "supports_sigma_schedules",
]
