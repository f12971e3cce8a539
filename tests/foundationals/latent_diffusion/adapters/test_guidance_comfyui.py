"""The ComfyUI flavours of the guidance equal ComfyUI's own node code (opt-in: needs a ComfyUI checkout).

ComfyUI's FreeU / FreeU_V2 output-block patches, its RescaleCFG cfg function and SAG's blur map run in
ComfyUI's python (`FLUXION_COMFYUI`, `FLUXION_COMFYUI_PYTHON`, as tests/nodes/test_real_comfyui.py) on tensors
written here; ours run on the same tensors. ComfyUI works in x0 / k-diffusion space (x = x0 + sigma eps), ours on
the UNet's output at the variance-preserving input: the test converts. Tolerance: `guidance_comfyui`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foundationals.latent_diffusion.adapters.guidance.cfg import RescaleCFGHook
from foundationals.latent_diffusion.adapters.guidance.freeu import fourier_filter, scale_backbone
from foundationals.latent_diffusion.adapters.guidance.sag import degraded_latents
from foundationals.latent_diffusion.guidance import GuidanceStep
from foundationals.latent_diffusion.solvers import make_solver
from tests.support.parity import assert_parity

COMFYUI = os.environ.get("FLUXION_COMFYUI", "")
PYTHON = os.environ.get("FLUXION_COMFYUI_PYTHON") or sys.executable

pytestmark = pytest.mark.skipif(
    not (COMFYUI and (Path(COMFYUI) / "main.py").is_file()),
    reason="set FLUXION_COMFYUI to a ComfyUI checkout (and FLUXION_COMFYUI_PYTHON to its python)",
)

SCRIPT = r"""
import sys
import torch
sys.path.insert(0, sys.argv[1])
from comfy.cli_args import args
args.cpu = True  # before comfy.model_management looks for a GPU
from comfy_extras.nodes_freelunch import FreeU, FreeU_V2
from comfy_extras.nodes_model_advanced import RescaleCFG
from comfy_extras.nodes_sag import create_blur_map

class Patcher:  # what the nodes call on a MODEL: clone() and the patch setters
    def __init__(self, model_channels):
        self.model = type("M", (), {})()
        self.model.model_config = type("C", (), {"unet_config": {"model_channels": model_channels}})()
        self.patches = {}
    def clone(self):
        return self
    def set_model_output_block_patch(self, patch):
        self.patches["output_block"] = patch
    def set_model_sampler_cfg_function(self, function, disable_cfg1_optimization=False):
        self.patches["cfg"] = function

inputs = torch.load(sys.argv[2])
outputs = {}
for name, node in (("v1", FreeU), ("v2", FreeU_V2)):
    patcher = Patcher(inputs["model_channels"])
    node.execute(patcher, *inputs["factors"])
    for width in (4, 2):
        h, skip = inputs[f"h{width}"], inputs[f"skip{width}"]
        outputs[f"{name}_{width}"] = patcher.patches["output_block"](h.clone(), skip.clone(), {})
patcher = Patcher(inputs["model_channels"])
RescaleCFG().patch(patcher, inputs["multiplier"])
x = inputs["x"]
args = {"cond": x - inputs["cond"], "uncond": x - inputs["uncond"], "cond_scale": inputs["scale"],
        "sigma": inputs["sigma"], "input": x}
outputs["rescale"] = x - patcher.patches["cfg"](args)
outputs["blur"] = create_blur_map(inputs["clean"], inputs["attention"], inputs["blur_sigma"], 1.0)
torch.save(outputs, sys.argv[3])
"""


def test_freeu_rescale_and_sag_blur_equal_comfyui_node_code(tmp_path):
    generator = torch.Generator().manual_seed(5)
    channels, factors = 8, (1.3, 1.4, 0.9, 0.2)  # model_channels 8: backbones of 32 and 16 channels
    inputs: dict = {"model_channels": channels, "factors": factors}
    for width in (4, 2):
        inputs[f"h{width}"] = torch.randn(2, width * channels, 8, 6, generator=generator)
        inputs[f"skip{width}"] = torch.randn(2, width * channels // 2, 8, 6, generator=generator)
    solver = make_solver("ddim", 10)
    timestep = solver.timesteps[3]
    model_input = torch.randn(2, 4, 8, 8, generator=generator)
    unconditional, conditional = (torch.randn(2, 4, 8, 8, generator=generator) for _ in range(2))
    step = GuidanceStep(3, 10, timestep, model_input, 6.0, solver.alphas_cumprod, "epsilon", None)  # type: ignore[arg-type]
    alpha = step.alpha_bar()
    sigma = ((1 - alpha) / alpha) ** 0.5
    inputs.update(
        x=model_input / alpha**0.5,  # k-diffusion input
        cond=step.to_clean(conditional),
        uncond=step.to_clean(unconditional),
        scale=6.0,
        sigma=sigma.reshape(1).repeat(2),
        multiplier=0.7,
        clean=torch.randn(2, 4, 8, 12, generator=generator),
        attention=torch.softmax(
            torch.randn(2 * 2, 6, 6, generator=generator) * 3, dim=-1
        ),  # 2 heads, 2 x 3 grid
        blur_sigma=2.0,
    )
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "comfy_reference.py").write_text(SCRIPT, encoding="utf-8")
    subprocess.run(
        [
            PYTHON,
            str(tmp_path / "comfy_reference.py"),
            COMFYUI,
            str(tmp_path / "inputs.pt"),
            str(tmp_path / "out.pt"),
        ],
        cwd=COMFYUI,
        check=True,
        timeout=300,
    )
    expected = torch.load(tmp_path / "out.pt")
    for version in (1, 2):
        for width, (backbone, skip) in ((4, (factors[0], factors[2])), (2, (factors[1], factors[3]))):
            h, hsp = expected[f"v{version}_{width}"]
            assert_parity("guidance_comfyui", scale_backbone(inputs[f"h{width}"], backbone, version), h)
            assert_parity("guidance_comfyui", fourier_filter(inputs[f"skip{width}"], 1, skip), hsp)
    cfg = unconditional + 6.0 * (conditional - unconditional)
    ours = RescaleCFGHook(0.7, "v").adjust(step, unconditional, conditional, cfg)
    assert_parity("guidance_comfyui", step.to_clean(ours), expected["rescale"])
    attention = inputs["attention"].reshape(2, 2, 6, 6)
    blurred = degraded_latents(
        inputs["clean"], torch.zeros(2, 4, 8, 12), torch.tensor(1.0), attention, (2, 3), 2.0
    )
    assert_parity("guidance_comfyui", blurred, expected["blur"])
