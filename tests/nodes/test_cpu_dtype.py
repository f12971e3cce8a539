"""The headless CPU dtype: fp32 by default, bf16 on request, `auto` by the CPU's flags (mocked here); the UNet and
text encoders follow it, the VAE stays fp32 unless asked; a bf16 UNet and a bf16 txt2img stay close to fp32.

Measured on the tiny models (AMD EPYC, avx512_bf16): UNet output max abs difference bf16 vs fp32 2.2e-3 on outputs
up to 0.26, 0.8 % of the max (bf16 keeps 8 bits of mantissa: ~4e-3 relative per rounding); the demo's txt2img latents (4 Euler
steps, CFG 6, a random model with latents up to ~50) 7 % of their max. Tolerances: 2 % of the output's max for
the UNet, 15 % of the latents' max for txt2img.
"""

from __future__ import annotations

import pytest
import torch

from foundationals.latent_diffusion.model_config import TINY_UNET
from foundationals.latent_diffusion.unet import UNet
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import SD15_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionTextEncode

CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n"


@pytest.fixture(autouse=True)
def headless_cpu(monkeypatch):
    monkeypatch.setattr(host, "_HOST", None)
    monkeypatch.setenv("FLUXION_DEVICE", "cpu")
    monkeypatch.delenv("FLUXION_CPU_DTYPE", raising=False)
    monkeypatch.delenv("FLUXION_CPU_VAE_DTYPE", raising=False)
    host.set_cpu_dtype(None, None)
    yield
    host.set_cpu_dtype(None, None)


@pytest.mark.parametrize(
    ("extra", "capability", "expected"),
    [
        ("avx512_bf16", "AVX512", torch.bfloat16),
        ("amx_bf16 amx_tile", "AVX512", torch.bfloat16),
        ("", "AVX512", torch.float32),
        ("avx512_bf16", "AVX2", torch.float32),  # torch's kernels would not use it
    ],
)
def test_auto_picks_bf16_by_the_cpu_flags(extra, capability, expected):
    flags = host.cpu_flags(CPUINFO.format(extra=extra))
    assert "avx2" in flags and ("avx512_bf16" in flags) == ("avx512_bf16" in extra)
    host.set_cpu_dtype("auto")
    assert host.cpu_dtype(flags=flags, capability=capability) == expected
    host.set_cpu_dtype("fp32")
    assert host.cpu_dtype(flags=flags, capability=capability) == torch.float32


def test_unet_and_text_encoders_follow_the_choice_and_the_vae_stays_fp32(monkeypatch):
    assert {
        role: host.model_placement(role).dtype for role in ("unet", "text_encoder", "vae")
    } == dict.fromkeys(("unet", "text_encoder", "vae"), torch.float32)
    monkeypatch.setenv("FLUXION_CPU_DTYPE", "bf16")
    assert host.model_placement("unet").dtype == torch.bfloat16
    assert host.model_placement("text_encoder").dtype == torch.bfloat16
    assert host.model_placement("controlnet").dtype == torch.bfloat16
    assert host.model_placement("vae").dtype == torch.float32
    host.set_cpu_dtype("fp32", "bf16")  # the setter wins over the environment
    assert host.model_placement("unet").dtype == torch.float32
    assert host.model_placement("vae").dtype == torch.bfloat16
    with pytest.raises(ValueError, match="expected one of fp32, bf16, auto"):
        host.set_cpu_dtype("fp8")
    host.set_cpu_dtype(None, None)
    monkeypatch.setenv("FLUXION_CPU_DTYPE", "half")
    with pytest.raises(ValueError, match="FLUXION_CPU_DTYPE='half'"):
        host.model_placement("unet")


def test_bf16_unet_is_close_to_fp32():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET)
    for parameter in unet.parameters():
        parameter.data.normal_(0, 0.05 if parameter.dim() > 1 else 0.1)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    text = torch.randn(2, 7, TINY_UNET.context_dim, generator=generator)

    def step(dtype: torch.dtype) -> torch.Tensor:
        unet.to(dtype=dtype)
        unet.set_timestep(torch.tensor([500.0]))
        unet.set_clip_text_embedding(text.to(dtype))
        with torch.no_grad():
            return unet(x.to(dtype)).float()

    exact, rounded = step(torch.float32), step(torch.bfloat16)
    scale = exact.abs().max().item()
    assert (rounded - exact).abs().max().item() <= 2e-2 * scale


def test_bf16_txt2img_on_the_demo_model_is_close_to_fp32(tmp_path, monkeypatch):
    write_demo_files(tmp_path / "models", tmp_path / "input")
    monkeypatch.setattr(host, "_models_dir", tmp_path / "models")
    size = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)

    def latents(choice: str) -> tuple[torch.Tensor, dict[str, torch.dtype]]:
        host.set_cpu_dtype(choice)
        # the checkpoint cache's key holds the placements: another dtype loads the file again
        model, clip, vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
        sd = model.model
        dtypes = {"unet": sd.unet.dtype, "text": sd.text_encoder.dtype, "vae": sd.autoencoder.dtype}
        positive = FluxionTextEncode().encode(clip, "a lighthouse", 1, **size)[0]
        negative = FluxionTextEncode().encode(clip, "fog", 1, **size)[0]
        latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
        out = FluxionSampler().sample(model, positive, negative, latent, 3, 4, 6.0, "euler", "normal", 1.0)[0]
        return out["samples"].float(), dtypes

    exact, exact_dtypes = latents("fp32")
    rounded, dtypes = latents("bf16")
    assert exact_dtypes == dict.fromkeys(("unet", "text", "vae"), torch.float32)
    assert dtypes == {"unet": torch.bfloat16, "text": torch.bfloat16, "vae": torch.float32}
    assert (rounded - exact).abs().max().item() <= 0.15 * exact.abs().max().item()
