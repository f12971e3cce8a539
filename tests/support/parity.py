"""Every parity check against a reference implementation, with the tolerance CI asserts, in one table.

README.md's "How correctness is shown" table is rendered from `PARITY` (`python -m tests.support.parity`
prints it; tests/test_readme_parity_table.py fails when the two differ), so the README's numbers are the
numbers CI checks. Each tolerance is a max abs difference, set just above the largest difference measured
on the CPUs CI has run on (the `achieved` column: AMD EPYC, 2026-12, with the earlier Intel Xeon figure
where it was larger), with head-room for another CPU's kernels (a different
SIMD width changes the summation order of a matmul or a convolution by a few ulps per layer).

Set `FLUXION_PARITY_LOG=path` to have every check append what it measured (one JSON object per line); a
run of the whole suite with it set gives the `achieved` column (`python -m tests.support.parity path`
prints the largest value per check next to its tolerance); `FLUXION_PARITY_MEASURE=1` also turns the
assertions off, so one run measures every check even where a tolerance is exceeded.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Parity:
    """One family of checks: what is compared with which reference, the asserted bound, what was measured."""

    compared: str
    reference: str
    tests: str
    asserted: float
    achieved: str


PARITY: dict[str, Parity] = {
    "clip_text": Parity(
        "CLIP-L / OpenCLIP-bigG text encoders (tiny): every hidden state, pooled projection",
        "transformers `CLIPTextModel(WithProjection)`",
        "clip/test_text_encoder.py",
        1e-06,
        "0.0",
    ),
    "clip_text_full": Parity(
        "CLIP-L text encoder, full size (bigG with `FLUXION_SLOW=1`)",
        "transformers `CLIPTextModel`",
        "clip/test_text_encoder.py",
        2e-06,
        "0.0",
    ),
    "clip_loading": Parity(
        "CLIP text encoders loaded from transformers folders, SD1.5/SDXL single files, open_clip layout",
        "transformers on the same weights",
        "clip/test_clip_loading.py",
        2e-06,
        "4.8e-7",
    ),
    "prompt_encoding": Parity(
        "SD1.5 / SDXL prompt conditioning (long prompts, negative prompts, clip skip)",
        "diffusers `encode_prompt`",
        "clip/test_prompt_encoding.py",
        1e-06,
        "0.0",
    ),
    "clip_image": Parity(
        "CLIP vision encoders (tiny): image embeds, every hidden state",
        "transformers `CLIPVisionModelWithProjection`",
        "clip/test_image_encoder.py",
        1e-06,
        "0.0",
    ),
    "unet": Parity(
        "UNet (tiny SD1.5, inpainting, SDXL; odd sizes; ControlNet residual inputs), outputs up to ~0.3",
        "diffusers `UNet2DConditionModel`",
        "latent_diffusion/test_unet.py",
        1e-06,
        "7.5e-8 (Intel: 3.4e-7)",
    ),
    "unet_sd15_full": Parity(
        "UNet, full-size SD1.5 (batch 2, 16x16 latent), outputs up to ~0.5",
        "diffusers `UNet2DConditionModel`",
        "latent_diffusion/test_unet.py",
        1e-05,
        "0.0 (Intel, 32x32 latent: 3.0e-6)",
    ),
    "unet_sdxl_full": Parity(
        "UNet, full-size SDXL base (batch 1, 32x32 latent; `FLUXION_SLOW=1`)",
        "diffusers `UNet2DConditionModel`",
        "latent_diffusion/test_unet.py",
        1e-05,
        "0.0",
    ),
    "vae": Parity(
        "Autoencoder (tiny SD1.5 / SDXL): encode (mean and sampled), decode, round trip",
        "diffusers `AutoencoderKL`",
        "latent_diffusion/test_auto_encoder.py",
        3e-05,
        "1.0e-5 (decode, outputs up to 2.2)",
    ),
    "vae_sd15_full": Parity(
        "Autoencoder, full-size SD1.5 (64x64 image): encode and decode",
        "diffusers `AutoencoderKL`",
        "latent_diffusion/test_auto_encoder.py",
        1e-05,
        "0.0",
    ),
    "checkpoint_loading": Parity(
        "UNet and autoencoder loaded from LDM single files and diffusers folders",
        "diffusers on the same weights",
        "latent_diffusion/test_checkpoint_loading.py",
        2e-06,
        "0.0 (Intel: < 1e-6)",
    ),
    "solvers": Parity(
        "Solver trajectories (DDIM, DDPM, DPM++ 2M, Euler, Euler a, LCM; Karras, trailing, ...)",
        "diffusers schedulers",
        "latent_diffusion/test_solvers.py",
        2e-05,
        "7.6e-6",
    ),
    "solvers_new": Parity(
        "Heun, LMS, UniPC bh1/bh2, DEIS, DPM++ SDE / 2M SDE heun, v-prediction + zero SNR: trajectories, "
        "max diff relative to the latents' magnitude",
        "diffusers schedulers",
        "latent_diffusion/test_solvers_more.py",
        2e-5,
        "4.5e-6",
    ),
    "solvers_comfyui": Parity(
        "k-diffusion samplers (euler ... dpmpp_3m_sde), eps and v-pred, step by step (with `FLUXION_COMFYUI`)",
        "ComfyUI 0.8.0 `comfy.k_diffusion.sampling`",
        "latent_diffusion/test_solvers_comfyui.py",
        5e-6,
        "1.1e-6",
    ),
    "v_prediction_pipeline": Parity(
        "v-prediction, zero-terminal-SNR txt2img images in [0, 1] (ddim, euler, dpmpp_2m, uni_pc_bh2)",
        "diffusers `StableDiffusionPipeline` (trailing spacing)",
        "latent_diffusion/test_v_prediction.py",
        6e-5,
        "2.2e-5",
    ),
    "sd15_pipelines": Parity(
        "SD1.5 txt2img / img2img / inpainting images in [0, 1]",
        "diffusers `StableDiffusion(Img2Img|Inpaint)Pipeline`",
        "latent_diffusion/test_stable_diffusion_pipeline.py",
        3e-05,
        "9.6e-6",
    ),
    "sdxl_pipelines": Parity(
        "SDXL txt2img / img2img / inpainting images in [0, 1], size and crop conditioning",
        "diffusers `StableDiffusionXL(Img2Img|Inpaint)Pipeline`",
        "latent_diffusion/test_sdxl_pipeline.py, test_sdxl_checkpoint.py",
        5e-05,
        "9.7e-6 (Intel: 1.6e-5)",
    ),
    "lora": Parity(
        "LoRA (diffusers/peft and kohya files) applied to UNet and text encoders: model outputs",
        "diffusers `load_lora_weights`",
        "adapters/test_lora_apply.py, test_lora_formats.py",
        2e-06,
        "0.0 (Intel: 5e-7)",
    ),
    "lora_deltas": Parity(
        "LoRA weight deltas read from diffusers/peft, kohya and LyCORIS files",
        "diffusers `load_lora_weights` (peft layers)",
        "adapters/test_lora_formats.py",
        1e-06,
        "0.0",
    ),
    "controlnet": Parity(
        "ControlNet residuals (SD1.5, SDXL; lllyasviel and diffusers files)",
        "diffusers `ControlNetModel`",
        "adapters/test_controlnet.py, test_sdxl_controlnet.py",
        1e-05,
        "2.2e-6 (Intel: 3e-6)",
    ),
    "controlnet_pipeline": Parity(
        "ControlNet images (scale, guess mode, start/end, several ControlNets)",
        "diffusers `StableDiffusionControlNetPipeline`",
        "adapters/test_controlnet.py",
        3e-05,
        "5.2e-6 (Intel: 8e-6)",
    ),
    "t2i_adapter": Parity(
        "T2I-Adapter features and UNet outputs (SD1.5 full / light, SDXL full_xl)",
        "diffusers `T2IAdapter`",
        "adapters/test_t2i_adapter.py",
        1e-05,
        "1.9e-6",
    ),
    "t2i_adapter_pipeline": Parity(
        "T2I-Adapter images (single, MultiAdapter)",
        "diffusers `StableDiffusionAdapterPipeline`",
        "adapters/test_t2i_adapter.py",
        3e-05,
        "6.3e-6 (Intel: 8e-6)",
    ),
    "ip_adapter": Parity(
        "IP-Adapter txt2img images (SD1.5 base and plus; SDXL base and plus)",
        "diffusers `load_ip_adapter`",
        "adapters/test_ip_adapter.py, test_sdxl_ip_adapter.py",
        5e-05,
        "7.7e-6 (Intel: 2.0e-5)",
    ),
    "guidance_sd15": Parity(
        "Guidance (tiny SD1.5) txt2img images: FreeU, rescaled CFG, CFG cutoff, PAG (layers, adaptive, no CFG), SAG",
        "diffusers `enable_freeu`, `guidance_rescale`, `SDCFGCutoffCallback`, `StableDiffusion(PAG|SAG)Pipeline`",
        "adapters/test_guidance.py",
        3e-05,
        "9.7e-6",
    ),
    "guidance_sdxl": Parity(
        "Guidance (tiny SDXL) txt2img images: FreeU, rescaled CFG, CFG cutoff, PAG, SAG",
        "diffusers `enable_freeu`, `guidance_rescale`, `SDXLCFGCutoffCallback`, `StableDiffusionXLPAGPipeline`, "
        "`StableDiffusionSAGPipeline`'s loop on the SDXL UNet",
        "adapters/test_sdxl_guidance.py",
        3e-05,
        "7.5e-6",
    ),
    "guidance_full": Parity(
        "FreeU and PAG's perturbed pass on the full-size SD1.5 UNet (one call, 16x16 latent; `FLUXION_SLOW=1`)",
        "diffusers `enable_freeu`, `PAGIdentitySelfAttnProcessor2_0`",
        "adapters/test_guidance_full_size.py",
        1e-05,
        "1.7e-6 (FreeU: 0.0)",
    ),
    "guidance_comfyui": Parity(
        "ComfyUI flavours: FreeU / FreeU V2 block patches, RescaleCFG, SAG blur map (`FLUXION_COMFYUI`)",
        "ComfyUI 0.8 `comfy_extras` node code",
        "adapters/test_guidance_comfyui.py",
        2e-05,
        "5.7e-6 (RescaleCFG, x0 up to ~12; FreeU, blur: 0.0)",
    ),
    "ip_adapter_weight_types": Parity(
        "IP-Adapter weight types, layer weights, precise variants (one UNet call, tiny SDXL and SD1.5 layouts)",
        "diffusers per-block `set_ip_adapter_scale` (dict form)",
        "adapters/test_ip_adapter_weight_types.py",
        1e-06,
        "0.0",
    ),
    "ip_adapter_faceid": Parity(
        "IP-Adapter FaceID / FaceID Plus v1, v2: projections, one UNet call (tiny SD1.5, SDXL), the FaceID LoRA file",
        "diffusers `IPAdapterFaceID(Plus)ImageProjection`, IP-Adapter attention processors, `load_lora_weights`",
        "adapters/test_ip_adapter_faceid.py",
        1e-06,
        "8.2e-8 (LoRA; the rest 0.0)",
    ),
    "style_aligned": Parity(
        "StyleAligned shared self-attention (one layer, CFG halves, scale, AdaIN q/k, reference shared or not)",
        "hand-written torch of refiners' `StyleAlignedAdapter` formulas (in the test)",
        "adapters/test_style_aligned.py",
        1e-05,
        "1.4e-6",
    ),
    "reference_adain": Parity(
        "Reference-only AdaIN of a block's output (per-channel mean/var, clamp, adain strength, style fidelity)",
        "hand-derived in plain Python (Advanced-ControlNet's `reference_adain` formulas)",
        "adapters/test_reference_only.py",
        1e-05,
        "4.8e-7",
    ),
    "token_merging": Parity(
        "Token merging (ToMe) merge / unmerge round trip; ComfyUI's with `FLUXION_COMFYUI`",
        "a per-token reference from the method's description; ComfyUI 0.8 `nodes_tomesd.py`",
        "adapters/test_token_merging.py",
        1e-06,
        "1.2e-7 (reference: means summed in another order); ComfyUI: 0.0",
    ),
    "multidiffusion": Parity(
        "MultiDiffusion tiled denoise (tiny SD1.5, DDIM, 15 overlapping views of a 16x24 latent): latents",
        "diffusers `StableDiffusionPanoramaPipeline`",
        "latent_diffusion/test_tiling.py",
        1e-04,
        "4.8e-5 (latents up to ~15: 3.3e-6 relative; the untiled run at this size: 5.3e-5)",
    ),
    "multidiffusion_float64": Parity(
        "The same MultiDiffusion run in float64 (averaged predictions vs diffusers' averaged next latents)",
        "diffusers `StableDiffusionPanoramaPipeline` in float64",
        "latent_diffusion/test_tiling.py",
        1e-10,
        "1.2e-13",
    ),
    "controlnet_union": Parity(
        "ControlNet Union / ProMax residuals (one hint per type, several hints with weights; release file names)",
        "diffusers `ControlNetUnionModel`",
        "adapters/test_controlnet_union.py",
        1e-05,
        "2.4e-6",
    ),
    "controlnet_union_pipeline": Parity(
        "ControlNet Union images (one hint with a scale, two hints with their scales)",
        "diffusers `StableDiffusionXLControlNetUnionPipeline`",
        "adapters/test_controlnet_union.py",
        3e-05,
        "8.4e-6",
    ),
    "control_lora": Parity(
        "Control-LoRA (tiny SDXL): the ControlNet's weights (UNet + up @ down), residuals, sampled latents",
        "the plain ControlNet derived by hand from the file (`tests/support/tiny_control_lora.py`)",
        "adapters/test_control_lora.py",
        1e-05,
        "0.0 (with a LoRA fused into the base: 1.5e-8)",
    ),
    "control_lora_comfyui": Parity(
        "Control-LoRA residuals on the same tiny file and UNet (`FLUXION_COMFYUI`)",
        "ComfyUI 0.8 `ControlLora` (comfy/controlnet.py)",
        "adapters/test_control_lora_comfyui.py",
        1e-05,
        "2.0e-6",
    ),
}


def max_abs_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute elementwise difference, computed in float64."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def check_parity(key: str, difference: float) -> None:
    """Assert a measured max abs difference is within the tolerance of check `key` (and log it)."""
    parity = PARITY[key]
    difference = float(difference)
    log = os.environ.get("FLUXION_PARITY_LOG")
    if log:
        record = {
            "check": key,
            "difference": difference,
            "cpu": cpu_name(),
            "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
        }
        with open(log, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
    if os.environ.get("FLUXION_PARITY_MEASURE") == "1":
        return  # measuring: log every check, fail none
    assert difference <= parity.asserted, (
        f"{key}: max abs difference {difference:.3g} exceeds the tolerance {_short(parity.asserted)} "
        f"({parity.compared} vs {parity.reference})"
    )


def assert_parity(
    key: str, actual: torch.Tensor | Iterable[torch.Tensor], expected: torch.Tensor | Iterable[torch.Tensor]
) -> float:
    """Compare one tensor, or matching sequences of tensors, with the reference within check `key`."""
    if isinstance(actual, torch.Tensor) and isinstance(expected, torch.Tensor):
        difference = max_abs_difference(actual, expected)
    else:
        pairs = list(zip(actual, expected, strict=True))
        difference = max(max_abs_difference(a, b) for a, b in pairs)
    check_parity(key, difference)
    return difference


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _short(value: float) -> str:
    """1e-06 -> 1e-6 (and 0.0001 -> 1e-4), as the README writes numbers."""
    text = f"{value:g}"
    if 0 < value < 1e-3 and "e" not in text:
        mantissa, exponent = f"{value:e}".split("e")
        text = f"{mantissa.rstrip('0').rstrip('.')}e{exponent}"
    mantissa, _, exponent = text.partition("e")
    return f"{mantissa}e{int(exponent)}" if exponent else mantissa


def readme_table() -> str:
    """The README's table of checks, rendered from `PARITY`."""
    lines = [
        "| Check | Reference | Asserted max abs diff | Achieved | Tests (`tests/foundationals/`) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for parity in PARITY.values():
        achieved = parity.achieved or "—"
        lines.append(
            f"| {parity.compared} | {parity.reference} | {_short(parity.asserted)} | {achieved} | {parity.tests} |"
        )
    return "\n".join(lines)


def summarize_log(path: str) -> str:
    """Largest logged difference per check, next to its tolerance."""
    worst: dict[str, tuple[float, str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        key, difference = record["check"], record["difference"]
        if key not in worst or difference > worst[key][0]:
            worst[key] = (difference, record.get("test", ""))
    rows = []
    for key, parity in PARITY.items():
        if key in worst:
            difference, test = worst[key]
            rows.append(f"{key:22} asserted {parity.asserted:<8g} achieved {difference:.2g}  ({test})")
        else:
            rows.append(f"{key:22} asserted {parity.asserted:<8g} not run")
    return "\n".join(rows)


if __name__ == "__main__":
    print(summarize_log(sys.argv[1]) if len(sys.argv) > 1 else readme_table())
