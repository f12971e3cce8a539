"""Speed and memory of our SD1.5 side by side with diffusers (and refiners 0.4.0) on the same random weights.

`python bench/run.py [--quick]` builds full-size SD1.5 with random weights once, shares every tensor
between diffusers/transformers, ours and refiners (see `sd15_side_by_side.py`), then times each section
interleaved (every repeat runs every implementation, in a rotating order) and reports medians and
ratios. Loading is measured in fresh subprocesses on a random fp32 single file. Writes BENCHMARKS.md
(repo root; `--output` to change). `--quick` uses tiny sizes and one repeat: a smoke run, not figures.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_sd15_single_file import write_random_sd15  # noqa: E402
from sd15_side_by_side import (  # noqa: E402
    REFINERS_VERSION,
    REPOSITORY,
    SD15_SCHEDULER,
    Reference,
    Refiners,
    diffusers_sd15,
    enable_refiners,
    ours_sd15,
    refiners_sd15,
)

OURS, DIFFUSERS, REFINERS = "ours", "diffusers", "refiners"


@dataclass
class Sizes:
    unet_latent: int
    vae_latent: int
    pipeline_image: int
    pipeline_steps: int
    lora_latent: int
    repeats: int
    pipeline_repeats: int


FULL = Sizes(
    unet_latent=32,
    vae_latent=32,
    pipeline_image=128,
    pipeline_steps=10,
    lora_latent=32,
    repeats=5,
    pipeline_repeats=2,
)
QUICK = Sizes(
    unet_latent=8,
    vae_latent=8,
    pipeline_image=64,
    pipeline_steps=2,
    lora_latent=8,
    repeats=1,
    pipeline_repeats=1,
)


@dataclass
class Row:
    """One measured figure: medians (seconds, or MiB for memory) per implementation."""

    section: str
    what: str
    medians: dict[str, float]
    unit: str = "s"
    samples: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


def interleaved(
    candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median wall time of each candidate; every repeat runs all of them, the order rotating each time."""
    names = list(candidates)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for _ in range(warmup):
            for name in names:
                candidates[name]()
        for repeat in range(repeats):
            order = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in order:
                gc.collect()
                start = time.perf_counter()
                candidates[name]()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}, samples


def max_difference(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# -- Compute sections --------------------------------------------------------------------------------


def unet_candidates(
    reference: Reference, ours: Any, refiners: Refiners | None, latent: int
) -> tuple[dict[str, Callable[[], Tensor]], str]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent, latent, generator=generator)
    timestep = torch.tensor([999.0])
    context = torch.randn(2, 77, 768, generator=generator)

    def run_ours() -> Tensor:
        ours.unet.set_timestep(timestep)
        ours.unet.set_clip_text_embedding(context)
        return ours.unet(x)

    candidates: dict[str, Callable[[], Tensor]] = {
        OURS: run_ours,
        DIFFUSERS: lambda: reference.unet(x, timestep, context).sample,
    }
    if refiners is not None:

        def run_refiners() -> Tensor:
            refiners.unet.set_timestep(timestep)
            refiners.unet.set_clip_text_embedding(context)
            return refiners.unet(x)

        candidates[REFINERS] = run_refiners
    return candidates, parity(candidates)


def text_candidates(
    reference: Reference, ours: Any, refiners: Refiners | None
) -> tuple[dict[str, Callable[[], Tensor]], str]:
    tokens = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(2))
    candidates: dict[str, Callable[[], Tensor]] = {
        OURS: lambda: ours.text_encoder(tokens),
        DIFFUSERS: lambda: reference.text_encoder(tokens).last_hidden_state,
    }
    if refiners is not None:
        candidates[REFINERS] = lambda: refiners.text_encoder(tokens)
    return candidates, parity(candidates)


def decode_candidates(
    reference: Reference, ours: Any, refiners: Refiners | None, latent: int
) -> tuple[dict[str, Callable[[], Tensor]], str]:
    latents = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(3))
    scale = ours.autoencoder.scaling_factor
    candidates: dict[str, Callable[[], Tensor]] = {
        OURS: lambda: ours.autoencoder.decode(latents),
        DIFFUSERS: lambda: reference.autoencoder.decode(latents / scale).sample,
    }
    if refiners is not None:
        candidates[REFINERS] = lambda: refiners.autoencoder.decode(latents)
    return candidates, parity(candidates)


def parity(candidates: dict[str, Callable[[], Tensor]]) -> str:
    """Max abs difference of each implementation's output from diffusers' (run once, outside timing)."""
    with torch.no_grad():
        outputs = {name: run() for name, run in candidates.items()}
    outputs = {name: value[0] if isinstance(value, tuple) else value for name, value in outputs.items()}
    return ", ".join(
        f"{name} vs diffusers max|Δ| {max_difference(value, outputs[DIFFUSERS]):.1e}"
        for name, value in outputs.items()
        if name != DIFFUSERS
    )


def pipeline_candidates(
    reference: Reference, ours: Any, refiners: Refiners | None, size: int, steps: int
) -> dict[str, Callable[[], Any]]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tests.support.tiny_sd import clip_tokenizer

    tokenizer = clip_tokenizer(Path(tempfile.gettempdir()) / "fluxion-bench" / "clip-tokenizer")
    pipe: Any = StableDiffusionPipeline(
        vae=reference.autoencoder,
        text_encoder=reference.text_encoder,
        tokenizer=tokenizer,
        unet=reference.unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False),  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    prompt, negative = "a red fox in the snow", "blurry"

    candidates: dict[str, Callable[[], Any]] = {
        OURS: lambda: ours.text_to_image(prompt, negative, width=size, height=size, steps=steps, seed=0),
        DIFFUSERS: lambda: (
            pipe(
                prompt,
                negative_prompt=negative,
                height=size,
                width=size,
                num_inference_steps=steps,
                generator=torch.Generator("cpu").manual_seed(0),
                output_type="pt",
            ).images
        ),
    }
    if refiners is not None:
        from refiners.foundationals.latent_diffusion import StableDiffusion_1
        from refiners.foundationals.latent_diffusion.solvers import DDIM

        refiners.text_encoder.insert(0, refiners.tokenizer)
        sd = StableDiffusion_1(
            unet=refiners.unet,
            lda=refiners.autoencoder,
            clip_text_encoder=refiners.text_encoder,
            solver=DDIM(num_inference_steps=steps),
        )
        refiners.text_encoder.pop(0)

        def run_refiners() -> Tensor:
            refiners.text_encoder.insert(0, refiners.tokenizer)
            try:
                embedding = sd.compute_clip_text_embedding(text=prompt, negative_text=negative)
            finally:
                refiners.text_encoder.pop(0)
            noise = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(0))
            x = sd.init_latents((size, size), noise=noise)
            for step in sd.steps:
                x = sd(x, step=step, clip_text_embedding=embedding, condition_scale=7.5)
            return (sd.lda.decode(x) / 2 + 0.5).clamp(0, 1)

        candidates[REFINERS] = run_refiners
    return candidates


# -- LoRA --------------------------------------------------------------------------------------------

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def write_kohya_loras(reference: Reference, folder: Path, count: int, rank: int = 16) -> list[Path]:
    """`count` kohya-style LoRA files (rank `rank`) on every attention projection of the UNet."""
    from safetensors.torch import save_file

    targets = [
        (name, module)
        for name, module in reference.unet.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".attn", 1)[-1][2:] in ATTENTION_PROJECTIONS
    ]
    paths = []
    for index in range(count):
        generator = torch.Generator().manual_seed(100 + index)
        tensors: dict[str, Tensor] = {}
        for name, module in targets:
            key = f"lora_unet_{name.replace('.', '_')}"
            tensors[f"{key}.lora_down.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) * 0.01
            )
            tensors[f"{key}.lora_up.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.01
            )
            tensors[f"{key}.alpha"] = torch.tensor(float(rank))
        path = folder / f"lora-{index}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths


def lora_rows(reference: Reference, ours: Any, sizes: Sizes, folder: Path) -> list[Row]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from foundationals.latent_diffusion.lora import SDLoraManager

    paths = write_kohya_loras(reference, folder, 3)
    pipe: Any = StableDiffusionPipeline(
        vae=reference.autoencoder,
        text_encoder=reference.text_encoder,
        tokenizer=None,  # type: ignore[arg-type]
        unet=reference.unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),  # type: ignore[arg-type]
        safety_checker=None,  # type: ignore[arg-type]
        feature_extractor=None,  # type: ignore[arg-type]
        requires_safety_checker=False,
    )
    manager = SDLoraManager.for_models(ours.unet)
    rows: list[Row] = []
    repeats = max(1, sizes.repeats - 2)
    candidates, check = unet_candidates(reference, ours, None, sizes.lora_latent)
    medians, samples = interleaved(candidates, repeats)
    rows.append(
        Row("LoRA", f"UNet step, 0 LoRA ({sizes.lora_latent}²)", medians, samples=samples, note=check)
    )
    for count in (1, 3):
        names = [f"lora{index}" for index in range(count)]
        for index in range(len(manager.names), count):
            manager.add_loras(names[index], paths[index])
            pipe.load_lora_weights(str(folder), weight_name=paths[index].name, adapter_name=names[index])
        pipe.set_adapters(names, [1.0] * count)
        candidates, check = unet_candidates(reference, ours, None, sizes.lora_latent)
        medians, samples = interleaved(candidates, repeats)
        rows.append(Row("LoRA", f"UNet step, {count} LoRA unfused", medians, samples=samples, note=check))
        # fused: one implementation at a time (both fuse in place, into the weights they share)
        fused: dict[str, list[float]] = {OURS: [], DIFFUSERS: []}
        for _ in range(max(1, repeats // 2)):
            manager.fuse()
            fused[OURS] += interleaved({OURS: candidates[OURS]}, 2, warmup=0)[1][OURS]
            manager.unfuse()
            pipe.fuse_lora(components=["unet"], adapter_names=names)
            fused[DIFFUSERS] += interleaved({DIFFUSERS: candidates[DIFFUSERS]}, 2, warmup=0)[1][DIFFUSERS]
            pipe.unfuse_lora(components=["unet"])
        rows.append(
            Row(
                "LoRA",
                f"UNet step, {count} LoRA fused",
                {name: statistics.median(values) for name, values in fused.items()},
                samples=fused,
            )
        )
    manager.clear()
    pipe.unload_lora_weights()
    return rows


# -- Loading (subprocesses) --------------------------------------------------------------------------

LOAD_CHILD = r"""
import json, sys, time
sys.path.insert(0, {repository!r})
import torch
def high_water_kib():  # VmHWM: this process' own peak (ru_maxrss also counts the parent image forked before exec)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
mode, path, config = sys.argv[1], sys.argv[2], sys.argv[3]
baseline = high_water_kib()
start = time.perf_counter()
if mode == "raw":
    from safetensors import safe_open
    with safe_open(path, framework="pt", device="cpu") as file:
        tensors = {{key: file.get_tensor(key) for key in file.keys()}}
    checksum = sum(t.flatten()[::1024].float().sum().item() for t in tensors.values())  # touch every page
    total = sum(t.numel() * t.element_size() for t in tensors.values())
elif mode == "ours":
    from foundationals.latent_diffusion.checkpoint import load_single_file
    checkpoint = load_single_file(path, dtype=torch.float32, text_encoders=True)
    models = [checkpoint.unet, checkpoint.autoencoder, *checkpoint.text_encoders.values()]
    checksum = sum(p.flatten()[::1024].sum().item() for m in models for p in m.parameters())
    total = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
else:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    models = [
        UNet2DConditionModel.from_single_file(path, config=config, subfolder="unet", local_files_only=True),
        AutoencoderKL.from_single_file(path, config=config, subfolder="vae", local_files_only=True),
    ]
    checksum = sum(p.flatten()[::1024].sum().item() for m in models for p in m.parameters())
    total = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
seconds = time.perf_counter() - start
peak = high_water_kib()
print(json.dumps({{"seconds": seconds, "peak_kib": peak, "baseline_kib": baseline, "loaded_bytes": total}}))
"""


def write_diffusers_configs(folder: Path) -> Path:
    """unet/ and vae/ config.json of SD1.5 for diffusers' `from_single_file(config=...)` (offline)."""
    reference = diffusers_sd15_configs()
    for name, model in reference.items():
        model.save_config(str(folder / name))
    return folder


def diffusers_sd15_configs() -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(cross_attention_dim=768, sample_size=64),
            "vae": AutoencoderKL(
                down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512],
                layers_per_block=2,
                sample_size=512,
            ),
        }


def measure_load(mode: str, path: Path, config: Path) -> dict[str, float] | str:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_CHILD.format(repository=str(REPOSITORY)), mode, str(path), str(config)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        return (
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


def load_rows(folder: Path, repeats: int) -> tuple[list[Row], list[str]]:
    path = folder / "sd15-random-ldm-fp32.safetensors"
    info = folder / "sd15-random-ldm-fp32.json"
    if not path.is_file() or not info.is_file():
        start = time.perf_counter()
        tensor_bytes = write_random_sd15(path, torch.float32)
        info.write_text(json.dumps({"tensor_bytes": tensor_bytes}))
        print(f"wrote {path} in {time.perf_counter() - start:.0f} s", flush=True)
    tensor_bytes = json.loads(info.read_text())["tensor_bytes"]
    config = write_diffusers_configs(folder / "diffusers-config")
    runs: dict[str, list[dict[str, float]]] = {"raw": [], OURS: [], DIFFUSERS: []}
    notes: list[str] = []
    for _ in range(repeats):
        for mode in runs:
            result = measure_load(mode, path, config)
            if isinstance(result, str):
                if not any(note.startswith(mode) for note in notes):
                    notes.append(f"{mode} single-file load failed: {result}")
                continue
            runs[mode].append(result)
    measured = {mode: values for mode, values in runs.items() if values}
    seconds = {mode: statistics.median(r["seconds"] for r in values) for mode, values in measured.items()}
    peak = {
        mode: max(r["peak_kib"] - r["baseline_kib"] for r in values) / 1024
        for mode, values in measured.items()
    }
    loaded = {mode: values[0]["loaded_bytes"] / 2**20 for mode, values in measured.items()}
    file_mib = tensor_bytes / 2**20
    what = f"fp32 single file ({file_mib:,.0f} MiB of tensors: UNet+VAE+CLIP-L)"
    rows = [
        Row("load", f"{what}: time", seconds, note="raw = safe_open every tensor, pages touched"),
        Row("load", f"{what}: peak RSS above import", peak, unit="MiB"),
        Row("load", "bytes loaded (diffusers: UNet+VAE only)", loaded, unit="MiB"),
    ]
    if OURS in seconds and "raw" in seconds:
        notes.append(
            f"our load: {seconds[OURS] / seconds['raw']:.2f}× the raw read's time, peak RSS "
            f"{peak[OURS] / file_mib:.2f}× the file's tensor bytes (targets ≤ 1.1×)"
        )
    return rows, notes


# -- Report ------------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers
    import transformers

    return {
        "cpu": cpu,
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "ours": _our_version(),
        "python": platform.python_version(),
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    }


def _our_version() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPOSITORY), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        return f"git {commit}{' (+ uncommitted changes)' if dirty else ''}"
    except OSError:
        return "unknown"


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "—"
    return f"{value:,.0f} MiB" if unit == "MiB" else f"{value:.3f} s"


def table(rows: list[Row], columns: list[str]) -> list[str]:
    header = ["section", "what", *columns, "ours/diffusers"]
    if REFINERS in columns:
        header.append("ours/refiners")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.section, row.what, *(format_value(row.medians.get(c), row.unit) for c in columns)]
        for other in ("diffusers", REFINERS) if REFINERS in columns else ("diffusers",):
            if OURS in row.medians and other in row.medians and row.medians[other] > 0:
                cells.append(f"{row.medians[OURS] / row.medians[other]:.3f}")
            else:
                cells.append("—")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def report(rows: list[Row], info: dict[str, str], notes: list[str], sizes: Sizes, quick: bool) -> str:
    columns = [OURS, DIFFUSERS]
    if any(REFINERS in row.medians for row in rows):
        columns.append(REFINERS)
    if any("raw" in row.medians for row in rows):
        columns.append("raw")
    lines = [
        "# Benchmarks: SD1.5 on CPU, ours side by side with diffusers and refiners",
        "",
        "Generated by `python bench/run.py" + (" --quick`" if quick else "`") + ": do not edit by hand. "
        "Full-size SD1.5 (UNet, autoencoder, CLIP-L) with random fp32 weights; the three implementations "
        "share the same weight tensors and run in one process, interleaved (each repeat runs every "
        "implementation, rotating the order); figures are medians. Lower is better; a ratio < 1 means "
        "ours is faster / smaller.",
        "",
        f"- machine: {info['cpu']}, torch threads = {info['threads']}, python {info['python']}",
        f"- versions: torch {info['torch']}, diffusers {info['diffusers']}, transformers "
        f"{info['transformers']}, refiners {REFINERS_VERSION}, ours {info['ours']}",
        f"- date: {info['date']}",
        f"- sizes: UNet step batch 2 (CFG) on a {sizes.unet_latent}×{sizes.unet_latent} latent; text encode "
        f"batch 2 × 77 tokens; VAE decode of a {sizes.vae_latent}×{sizes.vae_latent} latent to "
        f"{sizes.vae_latent * 8}² pixels; txt2img {sizes.pipeline_steps} DDIM steps at "
        f"{sizes.pipeline_image}² with CFG 7.5; LoRA: rank 16 on every attention projection (to_q/k/v/out) "
        f"on a {sizes.lora_latent}² UNet step; repeats {sizes.repeats} (pipeline {sizes.pipeline_repeats}, LoRA "
        f"{max(1, sizes.repeats - 2)}), after one warm-up run each.",
        "- noise: the machine is shared with other work; read ratios, not absolute seconds, and expect "
        "a few percent of run-to-run spread.",
        "",
        *table(rows, columns),
        "",
    ]
    parity_notes = [f"{row.what}: {row.note}" for row in rows if row.note]
    if parity_notes or notes:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in [*parity_notes, *notes]]
        lines.append("")
    lines += ["## Samples (seconds, in run order)", ""]
    for row in rows:
        if row.samples:
            parts = "; ".join(
                f"{name}: {', '.join(f'{value:.3f}' for value in values)}"
                for name, values in row.samples.items()
            )
            lines.append(f"- {row.section} / {row.what}: {parts}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "BENCHMARKS.md")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "fluxion-bench")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-refiners", action="store_true", help="skip refiners 0.4.0")
    parser.add_argument("--no-load", action="store_true", help="skip the single-file loading section")
    parser.add_argument(
        "--sections", default="load,unet,text,decode,pipeline,lora", help="comma-separated sections to run"
    )
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = set(args.sections.split(","))
    if args.no_load:
        sections.discard("load")
    args.folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[Row] = []
    notes: list[str] = []

    def done(new: list[Row]) -> None:
        rows.extend(new)
        for row in new:
            figures = ", ".join(
                f"{name} {format_value(value, row.unit)}" for name, value in row.medians.items()
            )
            print(
                f"[{time.perf_counter() - started:5.0f} s] {row.section} / {row.what}: {figures}", flush=True
            )

    if "load" in sections:
        load, load_notes = load_rows(args.folder, 1 if args.quick else 2)
        done(load)
        notes += load_notes
    refiners_note = "skipped (--no-refiners)" if args.no_refiners else enable_refiners()
    reference = diffusers_sd15()
    ours = ours_sd15(reference)
    refiners = None if refiners_note else refiners_sd15(reference, args.folder)
    if refiners_note:
        notes.append(f"refiners: {refiners_note}")
    print(f"[{time.perf_counter() - started:5.0f} s] models built", flush=True)
    if "unet" in sections:
        candidates, check = unet_candidates(reference, ours, refiners, sizes.unet_latent)
        medians, samples = interleaved(candidates, sizes.repeats)
        done(
            [Row("UNet", f"step, batch 2, {sizes.unet_latent}² latent", medians, samples=samples, note=check)]
        )
    if "text" in sections:
        candidates, check = text_candidates(reference, ours, refiners)
        medians, samples = interleaved(candidates, max(sizes.repeats, 3) * 2)
        done([Row("CLIP-L", "text encode, batch 2 × 77", medians, samples=samples, note=check)])
    if "decode" in sections:
        candidates, check = decode_candidates(reference, ours, refiners, sizes.vae_latent)
        medians, samples = interleaved(candidates, sizes.repeats)
        what = f"decode {sizes.vae_latent}² latent → {sizes.vae_latent * 8}²"
        done([Row("VAE", what, medians, samples=samples, note=check)])
    if "pipeline" in sections:
        candidates = pipeline_candidates(
            reference, ours, refiners, sizes.pipeline_image, sizes.pipeline_steps
        )
        medians, samples = interleaved(candidates, sizes.pipeline_repeats)
        what = f"txt2img {sizes.pipeline_steps} DDIM steps, {sizes.pipeline_image}², CFG"
        done([Row("pipeline", what, medians, samples=samples)])
    if "lora" in sections:
        done(lora_rows(reference, ours, sizes, args.folder))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    notes.append(f"this process' peak RSS {peak:,.0f} MiB; total run {time.perf_counter() - started:.0f} s")
    text = report(rows, machine(), notes, sizes, args.quick)
    args.output.write_text(text, encoding="utf-8")
    print("\n" + text)


if __name__ == "__main__":
    main()
