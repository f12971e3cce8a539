"""Benchmark parts for issue 22: the real competitor (ComfyUI), the machine's ceiling, FLOPs, bf16, accelerations.

- `ComfyWorker`: ComfyUI's own models in a subprocess of ComfyUI's venv (`comfyui_worker.py`), on the single file
  our models are written to; `ComfyCandidate` puts one of its calls into the benchmark's interleaved loop (the
  worker times itself: wall and its own CPU time).
- `measure_ceiling`: GFLOP/s of a 4096³ matmul and of a 320-channel 3×3 convolution, fp32 and bf16.
- `count_flops`: FLOPs of one call (`torch.utils.flop_counter.FlopCounterMode`: matmuls, convolutions, attention).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

COMFYUI = "comfyui"
COMFYUI_ENV = "FLUXION_BENCH_COMFYUI"
WORKER = Path(__file__).resolve().parent / "comfyui_worker.py"


def comfyui_checkout() -> Path | None:
    """The ComfyUI checkout named by FLUXION_BENCH_COMFYUI (None: the ComfyUI columns are skipped)."""
    value = os.environ.get(COMFYUI_ENV)
    return Path(value) if value else None


def comfyui_python(checkout: Path) -> Path:
    """ComfyUI's own interpreter: FLUXION_BENCH_COMFYUI_PYTHON, else the checkout's .venv."""
    value = os.environ.get("FLUXION_BENCH_COMFYUI_PYTHON")
    return Path(value) if value else checkout / ".venv" / "bin" / "python"


class RemoteTiming:
    """What a `ComfyCandidate` call returns: the worker's own wall and CPU seconds for the call."""

    def __init__(self, wall: float, cpu: float) -> None:
        self.wall, self.cpu = wall, cpu


class ComfyWorker:
    """A ComfyUI worker process: load a checkpoint, set inputs, run and time one model call at a time."""

    def __init__(self, checkout: Path, folder: Path) -> None:
        self.folder = folder
        environment = dict(os.environ, FLUXION_BENCH_THREADS=str(torch.get_num_threads()))
        self.process = subprocess.Popen(
            [str(comfyui_python(checkout)), str(WORKER), str(checkout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(folder / "comfyui-worker.log", "w"),  # noqa: SIM115 (lives as long as the worker)
            text=True,
            cwd=str(checkout),
            env=environment,
        )
        self.info: dict[str, Any] = {}

    def request(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the ComfyUI worker died (see {self.folder / 'comfyui-worker.log'})")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"ComfyUI worker: {reply['error']}")
        return reply

    def load(self, path: Path, dtype: str = "fp32", force_compute: bool = False) -> dict[str, Any]:
        self.info = self.request(op="load", path=str(path), dtype=dtype, force_compute=force_compute)
        return self.info

    def set_inputs(self, **tensors: Tensor) -> None:
        path = self.folder / "comfyui-inputs.pt"
        torch.save(
            {
                name: tensor.detach().cpu().float() if name != "tokens" else tensor.cpu()
                for name, tensor in tensors.items()
            },
            path,
        )
        self.request(op="inputs", path=str(path))

    def run(self, what: str) -> RemoteTiming:
        reply = self.request(op="run", what=what)
        return RemoteTiming(reply["wall"], reply["cpu"])

    def output(self, what: str) -> Tensor:
        path = self.folder / f"comfyui-{what}.pt"
        self.request(op="run", what=what, save=str(path))
        return torch.load(path)

    def close(self) -> None:
        try:
            self.request(op="exit")
        except (RuntimeError, OSError, ValueError):
            pass
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()


class ComfyCandidate:
    """One ComfyUI call as a benchmark candidate: calling it runs and times it in the worker."""

    def __init__(self, worker: ComfyWorker, what: str) -> None:
        self.worker, self.what = worker, what

    def __call__(self) -> RemoteTiming:
        return self.worker.run(self.what)

    def output(self) -> Tensor:
        return self.worker.output(self.what)


class _FlopCount(TorchDispatchMode):
    """`FlopCounterMode`'s formulas (`torch.utils.flop_counter.flop_registry`) without its module tracking, which
    trips on modules returning a parameter-derived tensor under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def count_flops(run: Callable[[], Any]) -> float:
    """FLOPs of one call of `run`, by torch.utils.flop_counter's formulas (matmuls, convolutions, attention)."""
    counter = _FlopCount()
    with torch.no_grad(), counter:
        run()
    return float(counter.total)


def _rate(run: Callable[[], Any], flops: float, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return flops / min(times) / 1e9


def measure_ceiling(quick: bool = False) -> dict[str, float]:
    """GFLOP/s (best of a few) of a 4096³ matmul and a 320-channel 3×3 conv on 2×320×64×64, fp32 and bf16."""
    size = 1024 if quick else 4096
    results: dict[str, float] = {}
    generator = torch.Generator().manual_seed(0)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size, generator=generator).to(dtype)
        b = torch.randn(size, size, generator=generator).to(dtype)
        results[f"matmul {name}"] = _rate(lambda a=a, b=b: a @ b, 2.0 * size**3, 2 if quick else 3)
        x = torch.randn(2, 320, 64, 64, generator=generator).to(dtype)
        weight = torch.randn(320, 320, 3, 3, generator=generator).to(dtype)
        conv_flops = count_flops(lambda x=x, weight=weight: torch.nn.functional.conv2d(x, weight, padding=1))
        results[f"conv {name}"] = _rate(
            lambda x=x, weight=weight: torch.nn.functional.conv2d(x, weight, padding=1),
            conv_flops,
            2 if quick else 4,
        )
    results["matmul size"] = float(size)
    return results


def psnr(image: Tensor, reference: Tensor) -> float:
    """Peak signal-to-noise ratio (dB) of an image in [0, 1] against the reference."""
    mse = (image.float() - reference.float()).pow(2).mean().item()
    return float("inf") if mse == 0 else 10.0 * float(torch.log10(torch.tensor(1.0 / mse)))
