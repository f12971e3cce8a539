"""Load time and peak memory of a full-size SD1.5 single file: our loader against a raw safetensors read.

Writes a random SD1.5 checkpoint in the original LDM layout (UNet + autoencoder + CLIP-L text encoder when
transformers is installed, fp16 like `v1-5-pruned-emaonly-fp16.safetensors`) once into a temp folder, then
runs every measurement in a fresh subprocess and reports its wall time and peak RSS (`getrusage` maxrss),
next to the file's tensor bytes. Usage: `python bench/load_sd15_single_file.py [--repeat 2] [--folder DIR]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

REPOSITORY = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repository!r})
import torch
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
mode, path = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if mode.startswith("safetensors"):
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as file:
        tensors = {{key: file.get_tensor(key) for key in file.keys()}}
    if mode.endswith("fp32"):
        tensors = {{key: t.float() for key, t in tensors.items()}}
    else:  # touch every page of the memory map, as a forward pass would
        checksum = sum(t.flatten()[::1024].float().sum().item() for t in tensors.values())
    total = sum(t.numel() * t.element_size() for t in tensors.values())
elif mode.startswith("fluxion"):
    from foundationals.latent_diffusion.checkpoint import load_single_file
    dtype = torch.float16 if mode.endswith("fp16") else torch.float32
    checkpoint = load_single_file(path, dtype=dtype, text_encoders=mode.startswith("fluxion+text"))
    models = [checkpoint.unet, checkpoint.autoencoder, *checkpoint.text_encoders.values()]
    total = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "peak_kib": peak, "baseline_kib": baseline, "loaded_bytes": total}}))
"""


def write_random_sd15(path: Path, dtype: torch.dtype | None = None) -> int:
    """A random full-size SD1.5 file in the LDM layout (fp16 unless `dtype`); returns its tensor bytes."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPOSITORY))
    from foundationals.formats.ldm import ldm_autoencoder_key_map, ldm_unet_key_map
    from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
    from foundationals.latent_diffusion.unet import UNet

    generator = torch.Generator().manual_seed(0)

    def random(shape: tuple[int, ...]) -> torch.Tensor:
        return (torch.randn(shape, generator=generator) * 0.02).to(dtype or torch.float16)

    tensors: dict[str, torch.Tensor] = {}
    for model, key_map, prefix in (
        (unet := UNet(device="meta"), ldm_unet_key_map(unet), "model.diffusion_model."),
        (
            vae := LatentDiffusionAutoencoder(device="meta"),
            ldm_autoencoder_key_map(vae),
            "first_stage_model.",
        ),
    ):
        shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
        for theirs, ours in key_map.items():
            shape = shapes[ours]
            if (
                prefix == "first_stage_model."
                and ".attn_1." in theirs
                and theirs.endswith("weight")
                and len(shape) == 2
            ):
                shape = (*shape, 1, 1)  # LDM stores the autoencoder's attention as 1x1 convolutions
            tensors[prefix + theirs] = random(shape)
    try:
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            clip = CLIPTextModel(  # OpenAI CLIP ViT-L/14's text tower
                CLIPTextConfig(
                    hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768
                )
            )
        for key, value in clip.state_dict().items():
            if not key.endswith("position_ids"):
                tensors[f"cond_stage_model.transformer.{key}"] = random(tuple(value.shape))
    except ImportError:
        print("transformers not installed: the file has no text encoder", file=sys.stderr)
    save_file(tensors, str(path))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def measure(mode: str, path: Path) -> dict[str, float]:
    """Run one load in a fresh interpreter; its time and peak RSS."""
    output = subprocess.run(
        [sys.executable, "-c", CHILD.format(repository=str(REPOSITORY)), mode, str(path)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "fluxion-bench")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    path = args.folder / "sd15-random-ldm-fp16.safetensors"
    info = args.folder / "sd15-random-ldm-fp16.json"
    if not path.is_file() or not info.is_file():
        start = time.perf_counter()
        file_bytes = write_random_sd15(path)
        info.write_text(json.dumps({"tensor_bytes": file_bytes}))
        print(
            f"wrote {path} ({file_bytes / 2**30:.2f} GiB of tensors) in {time.perf_counter() - start:.0f} s"
        )
    file_bytes = json.loads(info.read_text())["tensor_bytes"]

    modes = {
        "safetensors-fp16": "safe_open, every tensor, pages touched",
        "safetensors-fp32": "safe_open, every tensor .float()",
        "fluxion-fp16": "load_single_file UNet+VAE, fp16 (lazy)",
        "fluxion-fp32": "load_single_file UNet+VAE, fp32",
        "fluxion+text-fp32": "load_single_file UNet+VAE+CLIP-L, fp32",
    }
    print(f"\nfile: {path.name}, tensors {file_bytes / 2**20:,.0f} MiB\n")
    print(
        f"| {'what':40} | {'seconds':>7} | {'peak RSS MiB':>12} | {'RSS - import':>12} | {'loaded MiB':>10} |"
    )
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 14}|{'-' * 14}|{'-' * 12}|")
    for mode, label in modes.items():
        runs = [measure(mode, path) for _ in range(args.repeat)]
        best = min(runs, key=lambda run: run["seconds"])
        peak = max(run["peak_kib"] for run in runs) / 1024
        above = max(run["peak_kib"] - run["baseline_kib"] for run in runs) / 1024
        print(
            f"| {label:40} | {best['seconds']:7.2f} | {peak:12,.0f} | {above:12,.0f} | "
            f"{best['loaded_bytes'] / 2**20:10,.0f} |"
        )


if __name__ == "__main__":
    main()
