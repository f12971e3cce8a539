"""The pack's UNet under a real ComfyUI's ModelPatcher when a model does not fit whole (opt-in: `FLUXION_COMFYUI`).

`tests/support/comfyui_lowvram_probe.py` runs in ComfyUI's python, on the CPU, and drives ComfyUI's own
`ModelPatcher.load` with a memory budget (what `--lowvram`, `--novram` or a short GPU make `load_models_gpu` do;
`--cpu` itself always loads whole), `partially_unload`, a core weight patch and `--fp8_e4m3fn-unet`. On a CPU the
streamed copy of a weight is the weight itself, so these runs compare equal with the fully loaded run; on a GPU
the same hooks copy each streamed weight to the GPU for its layer's call.

    FLUXION_COMFYUI=/path/to/ComfyUI FLUXION_COMFYUI_PYTHON=/path/to/venv/bin/python \\
        python -m pytest tests/nodes/test_real_comfyui_lowvram.py
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPOSITORY = Path(__file__).resolve().parents[2]
SCRIPT = REPOSITORY / "tests" / "support" / "comfyui_lowvram_probe.py"
COMFYUI = os.environ.get("FLUXION_COMFYUI", "")
PYTHON = os.environ.get("FLUXION_COMFYUI_PYTHON") or sys.executable

pytestmark = pytest.mark.skipif(
    not (COMFYUI and (Path(COMFYUI) / "comfy" / "model_patcher.py").is_file()),
    reason="set FLUXION_COMFYUI to a ComfyUI checkout (and FLUXION_COMFYUI_PYTHON to its python)",
)


def _probe(*flags: str) -> dict[str, Any]:
    completed = subprocess.run(
        [PYTHON, str(SCRIPT), COMFYUI, *flags], capture_output=True, text=True, timeout=600, cwd=REPOSITORY
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default_flags() -> dict[str, Any]:
    return _probe()


def test_a_partial_load_streams_the_layers_comfyui_leaves_offloaded_and_the_output_is_the_same(default_flags):
    report = default_flags["lowvram"]
    assert report["hosted"] and report["layers"] > 100
    partial = report["lowvram"]
    assert partial["model_lowvram"] and 0 < partial["streamed"] < report["layers"]
    assert partial["equal"]


def test_the_text_encoder_streams_too(default_flags):
    report = default_flags["text_encoder"]
    assert report["streamed"] > 0 and report["equal"]


def test_a_partial_unload_to_make_room_streams_what_it_offloaded(default_flags):
    unloaded = default_flags["lowvram"]["partially_unloaded"]
    assert unloaded["freed"] > 0 and unloaded["streamed"] > 0 and unloaded["equal"]


def test_core_weight_patches_reach_streamed_layers_as_comfyui_applies_them_in_place(default_flags):
    patched = default_flags["lowvram"]["weight_function"]
    assert patched["layer_streamed"] and patched["functions"] == 1 and patched["changed"]
    assert patched["max_abs"] <= 1e-6  # measured 0: the same patch arithmetic on the same tensors


def test_loading_whole_again_through_the_pack_drops_the_streaming(default_flags):
    report = default_flags["lowvram"]
    assert report["reloaded"] == {"streamed": 0, "equal": True}
    assert report["listed"] == ["tiny UNet"]  # in ComfyUI's current_loaded_models


def test_fp8_unet_flag_stores_fp8_and_computes_in_comfyuis_compute_dtype():
    report = _probe("--fp8_e4m3fn-unet")["fp8"]
    assert report["dtype"] == "torch.float8_e4m3fn" and report["compute_dtype"] == "torch.float32"
    assert report["stored"] == ["torch.float8_e4m3fn"]
    assert report["max_abs"] <= 1e-6 * max(1.0, report["scale"])  # measured 0: exact upcasts, same operations
