"""Schedules and solvers that diffusers lacks (or defines otherwise) against ComfyUI's own code (opt-in).

ComfyUI's `simple`, `sgm_uniform`, `beta` schedulers, its Align-Your-Steps node and karras / exponential on the
model's full sigma range; our Beta quantile against scipy's; and the k-diffusion samplers ComfyUI runs (euler,
euler_ancestral, heun, lms, dpmpp_2s_ancestral, dpmpp_sde, dpmpp_2m, dpmpp_2m_sde, dpmpp_2m_sde_heun,
dpmpp_3m_sde) step by step against ours on the same sigmas, latents, fake model and noise, for epsilon and
v-prediction. `tests/support/comfyui_solver_reference.py` runs in ComfyUI's python and reports the differences.

Measured (ComfyUI 0.8.0, torch 2.14.1 CPU): schedules <= 9.8e-7 relative (ComfyUI builds the training sigmas
in float64, we in float32 as diffusers does); Beta quantile 1.2e-13 absolute; solver trajectories <= 1.1e-6
of the latents' magnitude. Tolerances: 3e-6, 1e-11 and 5e-6. LMS is compared up to its last step: ComfyUI's
returns the denoised latents there, ours (as diffusers') takes a multistep step to sigma 0.

    FLUXION_COMFYUI=/path/to/ComfyUI FLUXION_COMFYUI_PYTHON=/path/to/its/python \\
        python -m pytest tests/foundationals/latent_diffusion/test_solvers_comfyui.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.parity import check_parity

REPOSITORY = Path(__file__).resolve().parents[3]
SCRIPT = REPOSITORY / "tests" / "support" / "comfyui_solver_reference.py"
COMFYUI = os.environ.get("FLUXION_COMFYUI", "")
PYTHON = os.environ.get("FLUXION_COMFYUI_PYTHON") or sys.executable

pytestmark = pytest.mark.skipif(
    not (COMFYUI and (Path(COMFYUI) / "comfy" / "k_diffusion" / "sampling.py").is_file()),
    reason="set FLUXION_COMFYUI to a ComfyUI checkout (and FLUXION_COMFYUI_PYTHON to its python)",
)


@pytest.fixture(scope="module")
def differences() -> dict[str, float]:
    completed = subprocess.run(
        [PYTHON, str(SCRIPT), COMFYUI], capture_output=True, text=True, timeout=600, cwd=REPOSITORY
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _worst(differences: dict[str, float], prefix: str) -> tuple[float, list[str]]:
    picked = {key: value for key, value in differences.items() if key.startswith(prefix)}
    assert picked, f"no {prefix!r} results"
    return max(picked.values()), sorted(picked, key=picked.__getitem__)[-3:]


def test_schedules_equal_comfyuis(differences: dict[str, float]) -> None:
    worst, keys = _worst(differences, "schedule ")
    assert worst <= 3e-6, f"{worst:.2e} at {keys}"
    assert any(
        key.startswith("schedule beta 1000 ") for key in differences
    )  # with repeated timesteps dropped


def test_beta_quantile_equals_scipys(differences: dict[str, float]) -> None:
    assert differences["beta quantile"] <= 1e-11


@pytest.mark.parametrize(
    "name",
    [
        "euler",
        "euler_ancestral",
        "heun",
        "lms",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_2m_sde_heun",
        "dpmpp_3m_sde",
    ],
)
def test_solver_trajectories_equal_k_diffusions(differences: dict[str, float], name: str) -> None:
    worst, keys = _worst(differences, f"solver {name} ")
    check_parity("solvers_comfyui", worst)
