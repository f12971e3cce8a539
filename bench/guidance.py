"""What each guidance costs per step, and what a CFG cutoff saves: `python bench/guidance.py [--quick]`.

Runs the denoising loop (DDIM, CFG 6) on the full-size SD1.5 UNet with random weights (random text
embeddings: no text encoder or VAE is involved) with each guidance patch of
`foundationals.latent_diffusion.adapters.guidance` alone, then all of them at once, interleaved (every repeat
runs every configuration, in a rotating order), and reports per configuration: UNet passes and batch items
per step (counted), the median wall and CPU time per step, and the ratios to plain CFG in the same loop.
Writes its section into BENCHMARKS.md between markers (`bench/run.py` keeps the section when it rewrites
the file). `--quick`: the tiny UNet, one repeat (a smoke run, not figures).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY))
from foundationals.latent_diffusion.adapters.guidance import (  # noqa: E402
    CFGCutoffPatch,
    FreeUPatch,
    PAGPatch,
    RescaleCFGPatch,
    SAGPatch,
)
from foundationals.latent_diffusion.model_config import UNET_PRESETS  # noqa: E402
from foundationals.latent_diffusion.model_patch import SamplingRun, patched  # noqa: E402
from foundationals.latent_diffusion.sampling import Conditioning, denoise  # noqa: E402
from foundationals.latent_diffusion.solvers import make_solver  # noqa: E402
from foundationals.latent_diffusion.unet import UNet  # noqa: E402

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


def random_unet(preset: str) -> UNet:
    torch.manual_seed(0)
    unet = UNet(UNET_PRESETS[preset])
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.02 if parameter.dim() > 1 else 0.1)
    return unet.eval()


def run_once(unet: UNet, patches: list[Any], latent: int, steps: int) -> tuple[float, float, int, int]:
    """(wall s, CPU s, UNet calls, batch items) of one sampling run with `patches`."""
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
    try:
        with patched(SimpleNamespace(unet=unet), patches, run), torch.no_grad():  # type: ignore[arg-type]
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
    return wall, cpu, len(counted), sum(counted)


def measure(unet: UNet, latent: int, steps: int, repeats: int) -> dict[str, Measure]:
    names = list(CONFIGURATIONS)
    results = {name: Measure() for name in names}
    for name in names:  # warm-up, and the (deterministic) pass counts
        _, _, results[name].calls, results[name].items = run_once(unet, CONFIGURATIONS[name](), latent, steps)
    for repeat in range(repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            wall, cpu, _, _ = run_once(unet, CONFIGURATIONS[name](), latent, steps)
            results[name].wall.append(wall / steps)
            results[name].cpu.append(cpu / steps)
            print(f"repeat {repeat + 1}/{repeats} {name}: {wall / steps:.3f} s/step", flush=True)
    return results


def section(results: dict[str, Measure], preset: str, latent: int, steps: int, repeats: int) -> str:
    base = results["plain CFG"]
    base_wall, base_cpu = statistics.median(base.wall), statistics.median(base.cpu)
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
        f"Generated by `python bench/guidance.py`: do not edit by hand. The {preset} UNet (random weights), "
        f"{steps} DDIM steps on a {latent}×{latent} latent at CFG 6, batch 1 (CFG: one UNet pass of batch 2); "
        f"each configuration {repeats} times, interleaved; median time per step, and its ratio to plain CFG "
        "in the same loop (wall; CPU time of this process in the last column). UNet passes and batch items are "
        "counted per step (averaged over the run).",
        "",
        f"- machine: {cpu}, torch threads = {torch.get_num_threads()}, torch {torch.__version__}, "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        "| guidance | UNet passes / step | batch items / step | time / step | × plain CFG | × plain CFG (CPU) |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        wall, cpu_time = statistics.median(result.wall), statistics.median(result.cpu)
        lines.append(
            f"| {name} | {result.calls / steps:.2f} | {result.items / steps:.2f} | {wall:.3f} s | "
            f"{wall / base_wall:.3f} | {cpu_time / base_cpu:.3f} |"
        )
    cutoff = results["CFG cutoff 0.4"]
    lines += [
        "",
        "- PAG and SAG run one more UNet pass of batch 1 per step (1.5× the batch items of CFG); FreeU and "
        "rescaled CFG add no pass (FreeU: two FFTs per decoder block it acts on).",
        f"- CFG cutoff at 0.4 of {steps} steps keeps CFG on steps 0..{int(steps * 0.4)} and runs batch 1 after: "
        f"{cutoff.items / base.items:.3f}× the batch items, {statistics.median(cutoff.wall) / base_wall:.3f}× "
        "the time of plain CFG.",
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
    parser.add_argument("--latent", type=int, default=16, help="latent side (default 16: 128² pixels)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPOSITORY / "BENCHMARKS.md")
    args = parser.parse_args()
    preset = "tiny" if args.quick else "sd15"
    repeats = 1 if args.quick else args.repeats
    unet = random_unet(preset)
    results = measure(unet, args.latent, args.steps, repeats)
    text = section(results, "tiny" if args.quick else "full-size SD1.5", args.latent, args.steps, repeats)
    print(text)
    if not args.quick:
        write_section(args.output, text)


if __name__ == "__main__":
    main()
