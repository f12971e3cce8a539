"""What each guidance costs per step, and what a CFG cutoff saves: `python bench/guidance.py [--quick]`.

Runs the denoising loop (DDIM, CFG 6) on a UNet with random weights (default: SD1.5's architecture at a fifth
of its widths, `--preset sd15` for the full size; random text embeddings: no text encoder or VAE is involved)
with each guidance patch of
`foundationals.latent_diffusion.adapters.guidance` alone, then all of them at once, interleaved (every repeat
runs every configuration, in a rotating order), and reports per configuration: UNet passes, batch items and FLOPs
per step (counted), the fastest run's wall and CPU time per step, and the ratios to plain CFG in the same loop.
Writes its section into BENCHMARKS.md between markers (`bench/run.py` keeps the section when it rewrites
the file). `--quick`: the tiny UNet, one repeat (a smoke run, not figures).

Extra passes cost the same fraction of a step at any width; FreeU's FFTs and SAG's blur are small next to
a UNet pass, relatively smaller at full size.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
from foundationals.latent_diffusion.adapters.guidance import (  # noqa: E402
    CFGCutoffPatch,
    FreeUPatch,
    PAGPatch,
    RescaleCFGPatch,
    SAGPatch,
)
from foundationals.latent_diffusion.model_config import SD15_UNET, UNET_PRESETS, UNetConfig  # noqa: E402
from foundationals.latent_diffusion.model_patch import SamplingRun, patched  # noqa: E402
from foundationals.latent_diffusion.sampling import Conditioning, denoise  # noqa: E402
from foundationals.latent_diffusion.solvers import make_solver  # noqa: E402
from foundationals.latent_diffusion.unet import UNet  # noqa: E402

PRESETS: dict[str, tuple[UNetConfig, str]] = {
    "small": (replace(SD15_UNET, block_channels=(64, 128, 256, 256)), "SD1.5-architecture UNet at 1/5 width"),
    "sd15": (SD15_UNET, "full-size SD1.5 UNet"),
    "tiny": (UNET_PRESETS["tiny"], "tiny UNet"),
}
BEGIN, END = "<!-- guidance-bench:begin -->", "<!-- guidance-bench:end -->"

CONFIGURATIONS: dict[str, Callable[[], list[Any]]] = {
    "plain CFG": list,
    "FreeU": lambda: [FreeUPatch()],
    "FreeU v2": lambda: [FreeUPatch(1.3, 1.4, version=2)],
    "PAG (mid)": lambda: [PAGPatch(3.0)],
    "SAG": lambda: [SAGPatch(0.5, 2.0)],
    "rescaled CFG (v)": lambda: [RescaleCFGPatch(0.7, "v")],
    "CFG cutoff 0.4": lambda: [CFGCutoffPatch(0.4)],
    "all five (cutoff 0.4)": lambda: [
        FreeUPatch(),
        PAGPatch(3.0),
        SAGPatch(0.5, 2.0),
        RescaleCFGPatch(0.7, "v"),
        CFGCutoffPatch(0.4),
    ],
}


@dataclass
class Measure:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    calls: int = 0
    items: int = 0
    flops: int = 0


def random_unet(preset: str) -> UNet:
    torch.manual_seed(0)
    unet = UNet(PRESETS[preset][0])
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.02 if parameter.dim() > 1 else 0.1)
    return unet.eval()


def run_once(
    unet: UNet, patches: list[Any], latent: int, steps: int, count_flops: bool = False
) -> tuple[float, float, int, int, int]:
    """(wall s, CPU s, UNet calls, batch items, FLOPs or 0) of one sampling run with `patches`."""
    config = unet.config
    generator = torch.Generator().manual_seed(1)
    positive = Conditioning(torch.randn(1, 77, config.context_dim, generator=generator))
    negative = Conditioning(torch.randn(1, 77, config.context_dim, generator=generator))
    latents = torch.randn(1, config.in_channels, latent, latent, generator=generator)
    solver = make_solver("ddim", steps)
    run = SamplingRun(steps, 0, latent, latent, 1, uses_guidance=True)
    counted: list[int] = []
    original = unet.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        counted.append(x.shape[0])
        return original(x)

    unet.forward = forward  # type: ignore[method-assign]
    counter = FlopCounterMode(display=False)
    try:
        with (
            patched(SimpleNamespace(unet=unet), patches, run),  # type: ignore[arg-type]
            torch.no_grad(),
            counter if count_flops else nullcontext(),
        ):
            wall, cpu = time.perf_counter(), time.process_time()
            denoise(
                unet,
                solver,
                latents,
                positive,
                negative,
                6.0,
                step_hook=run.run_step_hooks,
                predict=lambda x: run.predict(unet, x),
                guidance=run.guidance_stack(),
            )
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        del unet.forward
    return wall, cpu, len(counted), sum(counted), counter.get_total_flops() if count_flops else 0


def measure(unet: UNet, latent: int, steps: int, repeats: int) -> dict[str, Measure]:
    names = list(CONFIGURATIONS)
    results = {name: Measure() for name in names}
    for name in names:  # warm-up, and the (deterministic) pass, batch and FLOP counts
        counts = run_once(unet, CONFIGURATIONS[name](), latent, steps, count_flops=True)
        results[name].calls, results[name].items, results[name].flops = counts[2:]
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            wall, cpu, *_ = run_once(unet, CONFIGURATIONS[name](), latent, steps)
            results[name].wall.append(wall / steps)
            results[name].cpu.append(cpu / steps)
            print(f"repeat {repeat + 1}/{repeats} {name}: {wall / steps:.3f} s/step", flush=True)
    return results


def section(
    results: dict[str, Measure], preset: str, latent: int, steps: int, repeats: int, load: str
) -> str:
    base = results["plain CFG"]
    base_wall, base_cpu = min(base.wall), min(base.cpu)
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    lines = [
        BEGIN,
        "## Guidance: cost per step",
        "",
        f"Generated by `python bench/guidance.py`: do not edit by hand. The {preset} (random weights), "
        f"{steps} DDIM steps on a {latent}×{latent} latent at CFG 6, batch 1 (CFG: one UNet pass of batch 2). "
        "Counted per step (deterministic): UNet passes, batch items, and FLOPs (`torch.utils.flop_counter`: "
        "matmuls and convolutions, i.e. the UNet passes; FFTs, blurs and elementwise work are not counted). "
        f"Timed: each configuration {repeats} times, interleaved; the fastest run's time per step (the least "
        "disturbed by other processes) and its ratio to plain CFG's, by wall and by this process' CPU time.",
        "",
        f"- machine: {cpu}, torch threads = {torch.get_num_threads()}, torch {torch.__version__}, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; load average during the run {load} on "
        f"{os.cpu_count()} cores (shared: the timed ratios are rough, the counts exact)",
        "",
        "| guidance | UNet passes / step | batch items / step | GFLOP / step | × plain CFG (FLOPs) "
        "| time / step | × plain CFG (wall) | × plain CFG (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        wall, cpu_time = min(result.wall), min(result.cpu)
        lines.append(
            f"| {name} | {result.calls / steps:.2f} | {result.items / steps:.2f} | "
            f"{result.flops / steps / 1e9:.1f} | {result.flops / base.flops:.3f} | {wall:.3f} s | "
            f"{wall / base_wall:.3f} | {cpu_time / base_cpu:.3f} |"
        )
    cutoff = results["CFG cutoff 0.4"]
    lines += [
        "",
        "- PAG and SAG run one more UNet pass of batch 1 per step: 1.5× the batch items and FLOPs of CFG. FreeU "
        "and rescaled CFG add no pass (FreeU: two small FFTs per decoder block it acts on).",
        f"- CFG cutoff at 0.4 of {steps} steps keeps CFG on steps 0..{int(steps * 0.4)} and runs batch 1 after: "
        f"{cutoff.items / base.items:.3f}× the batch items, {cutoff.flops / base.flops:.3f}× the FLOPs, "
        f"{min(cutoff.wall) / base_wall:.3f}× the time of plain CFG.",
        END,
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, text: str) -> None:
    """Replace the guidance section of BENCHMARKS.md (or append it)."""
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    if BEGIN in current and END in current:
        before, rest = current.split(BEGIN, 1)
        after = rest.split(END, 1)[1].lstrip("\n")
        updated = before + text + ("\n" + after if after else "")
    else:
        updated = current.rstrip("\n") + "\n\n" + text
    path.write_text(updated, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny UNet, one repeat: a smoke run")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--latent", type=int, default=32, help="latent side (default 32: 256² pixels)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, default=REPOSITORY / "BENCHMARKS.md")
    args = parser.parse_args()
    preset = "tiny" if args.quick else args.preset
    repeats = 1 if args.quick else args.repeats
    unet = random_unet(preset)
    load_before = os.getloadavg()[1]
    results = measure(unet, args.latent, args.steps, repeats)
    load = f"{(load_before + os.getloadavg()[1]) / 2:.1f}"
    text = section(results, PRESETS[preset][1], args.latent, args.steps, repeats, load)
    print(text)
    if not args.quick:
        write_section(args.output, text)


if __name__ == "__main__":
    main()
