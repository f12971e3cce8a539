"""Our Control-LoRA equals ComfyUI core's `ControlLora` on the same tiny file (opt-in: needs a ComfyUI checkout).

The tiny SDXL UNet (LDM names, from diffusers' conversion) and a Control-LoRA file in Stability's layout
(`tests/support/tiny_control_lora.py`) are written here. In ComfyUI's python (`FLUXION_COMFYUI`,
`FLUXION_COMFYUI_PYTHON`, as tests/nodes/test_real_comfyui.py) the UNet is built from the config ComfyUI's own
`model_detection.detect_unet_config` reads off its keys (heads of 16 channels, as the tiny preset), its weights
loaded strictly; `ControlLora(load_torch_file(file)).pre_run(model, ...)` then builds core's control model from
that UNet exactly as a sampling run does, and it runs on the inputs written here: x, hint, timesteps, context and
y (pooled text + ComfyUI's `Timestep` embedding of the 6 size ids, as `model_base.SDXL.encode_adm`). Ours runs
on the same. Compared: every control residual ("output" then "middle"). Tolerance: `control_lora_comfyui`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fluxion.utils import save_to_safetensors
from foundationals.latent_diffusion.adapters.controlnet import load_control_lora
from tests.support.parity import assert_parity
from tests.support.tiny_control_lora import stability_control_lora, tiny_sdxl_base

COMFYUI = os.environ.get("FLUXION_COMFYUI", "")
PYTHON = os.environ.get("FLUXION_COMFYUI_PYTHON") or sys.executable

pytestmark = pytest.mark.skipif(
    not (COMFYUI and (Path(COMFYUI) / "main.py").is_file()),
    reason="set FLUXION_COMFYUI to a ComfyUI checkout (and FLUXION_COMFYUI_PYTHON to its python)",
)

SCRIPT = r"""
import sys
from types import SimpleNamespace
import torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management looks for a GPU
import comfy.model_detection
import comfy.ops
import comfy.utils
from comfy.controlnet import ControlLora
from comfy.ldm.modules.diffusionmodules.openaimodel import Timestep, UNetModel

inputs = torch.load(sys.argv[2])
unet_sd = comfy.utils.load_torch_file(sys.argv[3])
config = comfy.model_detection.detect_unet_config(unet_sd, "")
config.update(num_heads=-1, num_head_channels=inputs["head_channels"])
diffusion_model = UNetModel(**config, dtype=torch.float32, operations=comfy.ops.disable_weight_init)
diffusion_model.load_state_dict(unet_sd, strict=True)
model = SimpleNamespace(
    model_config=SimpleNamespace(unet_config=config),
    manual_cast_dtype=None,
    get_dtype=lambda: torch.float32,
    diffusion_model=diffusion_model,
    model_sampling=None,
)
control = ControlLora(comfy.utils.load_torch_file(sys.argv[4]))
control.pre_run(model, lambda percent: percent)
embedder = Timestep(inputs["time_id_dim"])
ids = inputs["time_ids"]
flat = torch.cat([embedder(ids[:, i]) for i in range(ids.shape[1])], dim=1)
y = torch.cat([inputs["pooled"], flat], dim=1)
with torch.no_grad():
    out = control.control_model(
        x=inputs["x"], hint=inputs["hint"], timesteps=inputs["timesteps"], context=inputs["context"], y=y
    )
torch.save({"residuals": [*out["output"], *out["middle"]]}, sys.argv[5])
"""


def test_control_lora_residuals_equal_comfyui_core(tmp_path):
    unet, ldm = tiny_sdxl_base()
    tensors = stability_control_lora(ldm)
    save_to_safetensors(tmp_path / "unet.safetensors", ldm)
    save_to_safetensors(tmp_path / "control-lora.safetensors", tensors)
    config = unet.config
    generator = torch.Generator().manual_seed(5)
    inputs = {
        "x": torch.randn(2, 4, 8, 8, generator=generator),
        "hint": torch.rand(2, 3, 64, 64, generator=generator),
        "timesteps": torch.tensor([411.0, 37.0]),
        "context": torch.randn(2, 7, config.context_dim, generator=generator),
        "pooled": torch.randn(2, config.pooled_text_dim, generator=generator),
        "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [40.0, 24.0, 4.0, 2.0, 32.0, 32.0]]),
        "time_id_dim": config.time_id_embedding_dim,
        "head_channels": config.attention_head_dim,
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "comfy_reference.py").write_text(SCRIPT, encoding="utf-8")
    subprocess.run(
        [
            PYTHON,
            str(tmp_path / "comfy_reference.py"),
            COMFYUI,
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "unet.safetensors"),
            str(tmp_path / "control-lora.safetensors"),
            str(tmp_path / "out.pt"),
        ],
        cwd=COMFYUI,
        check=True,
        timeout=300,
    )
    expected = torch.load(tmp_path / "out.pt")["residuals"]

    controlnet = load_control_lora(tmp_path / "control-lora.safetensors").controlnet(unet)
    controlnet.set_timestep(inputs["timesteps"])
    controlnet.set_clip_text_embedding(inputs["context"])
    controlnet.set_sdxl_conditioning(inputs["pooled"], inputs["time_ids"])
    controlnet.set_hint(inputs["hint"])
    with torch.no_grad():
        ours = list(controlnet(inputs["x"]))
    assert len(ours) == len(expected) == 10
    assert min(r.abs().max().item() for r in expected) > 1e-3  # every residual carries signal
    difference = assert_parity("control_lora_comfyui", ours, expected)
    print(f"Control-LoRA vs ComfyUI ControlLora: max abs diff {difference:.2e}")
