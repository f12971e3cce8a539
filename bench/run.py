"""Speed and memory of our SD1.5 / SDXL side by side with diffusers (and refiners 0.4.0) on the same random weights.

`python bench/run.py [--quick] [--device cuda --dtype fp16]` builds full-size models with random weights,
shares every tensor between diffusers/transformers, ours and refiners (see `sd15_side_by_side.py`), then
times each section interleaved (every repeat runs every implementation, in a rotating order) and reports
medians and ratios, by wall time and by this process' CPU time (the machine may be shared: CPU time is
less disturbed by other processes). Loading is measured in fresh subprocesses on a random fp32 single
file. Writes BENCHMARKS.md (repo root; `--output` to change). `--quick` uses tiny sizes and one repeat:
a smoke run, not figures.

A section is a function `(Bench) -> list[Row]` in `SECTIONS` (name, function, in the default run or not):
to add one, write the function and append it to the list.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

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
    random_weights,
    refiners_sd15,
)
from speed_sections import (  # noqa: E402
    COMFYUI,
    ComfyCandidate,
    ComfyWorker,
    RemoteTiming,
    comfyui_checkout,
    count_flops,
    measure_ceiling,
    psnr,
)

OURS, DIFFUSERS, REFINERS = "ours", "diffusers", "refiners"


@dataclass
class Sizes:
    unet_latent: int
    vae_latent: int
    pipeline_image: int
    pipeline_steps: int
    lora_latent: int
    sdxl_latent: int
    scaling_latents: tuple[int, ...]
    scaling_batches: tuple[int, ...]
    repeats: int
    pipeline_repeats: int


FULL = Sizes(
    unet_latent=32,
    vae_latent=32,
    pipeline_image=128,
    pipeline_steps=10,
    lora_latent=32,
    sdxl_latent=32,
    scaling_latents=(16, 32, 48, 64),
    scaling_batches=(1, 2, 4),
    repeats=4,
    pipeline_repeats=2,
)
QUICK = Sizes(
    unet_latent=8,
    vae_latent=8,
    pipeline_image=64,
    pipeline_steps=2,
    lora_latent=8,
    sdxl_latent=8,
    scaling_latents=(8, 16),
    scaling_batches=(1, 2),
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
    cpu: dict[str, float] = field(default_factory=dict)  # medians of this process' CPU time
    flops: float | None = (
        None  # FLOPs of one call (torch.utils.flop_counter), the same for every implementation
    )
    dtype: str = "fp32"  # the compute dtype (which ceiling the achieved GFLOP/s is read against)


@dataclass
class Timing:
    medians: dict[str, float]
    samples: dict[str, list[float]]
    cpu: dict[str, float]

    def row(self, section: str, what: str, note: str = "", only: tuple[str, ...] | None = None) -> Row:
        keep = only or tuple(self.medians)
        return Row(
            section,
            what,
            {name: self.medians[name] for name in keep},
            samples={name: self.samples[name] for name in keep},
            note=note,
            cpu={name: self.cpu[name] for name in keep if name in self.cpu},
        )


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Bench:
    """What every section gets: sizes, device and dtype, the shared SD1.5 models (built on first use), notes."""

    sizes: Sizes
    folder: Path
    device: torch.device
    dtype: torch.dtype
    use_refiners: bool = True
    notes: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)  # markdown blocks after the main table
    _models: tuple[Reference, Any, Refiners | None] | None = None
    ceiling: dict[str, float] = field(default_factory=dict)  # GFLOP/s of the machine (see `ceiling_section`)
    _comfy: ComfyWorker | None = None
    _comfy_dtype: str | None = None
    _single_file_written: bool = False
    load_averages: list[str] = field(default_factory=list)

    def comfy(self, dtype: str = "fp32", force_compute: bool = False) -> ComfyWorker | None:
        """ComfyUI's models in a worker process (FLUXION_BENCH_COMFYUI), on our SD1.5 weights written as a single
        file; None when no checkout is named or off the CPU."""
        checkout = comfyui_checkout()
        if checkout is None or self.cuda:
            return None
        key = f"{dtype}{' forced' if force_compute else ''}"
        if self._comfy is None:
            self.write_single_file()
            self._comfy = ComfyWorker(checkout, self.folder)
        if self._comfy_dtype != key:
            info = self._comfy.load(self.folder / "sd15-random-fp32.safetensors", dtype, force_compute)
            self._comfy_dtype = key
            self.notes.append(
                f"ComfyUI ({checkout}, torch {info['torch']}, {info['threads']} threads) loaded the single file "
                f"in {key}: UNet weights {info['unet_dtype']}, manual cast {info['manual_cast']}"
            )
        return self._comfy

    def write_single_file(self) -> Path:
        """Our fp32 SD1.5 (the tensors diffusers' models share) as an original-layout single file, once per run."""
        from foundationals.latent_diffusion.checkpoint_export import save_single_file

        path = self.folder / "sd15-random-fp32.safetensors"
        if not self._single_file_written:
            _, ours, _ = self.models()
            if ours.unet.dtype != torch.float32 or self.device.type != "cpu":
                raise RuntimeError("the ComfyUI single file is written from the fp32 CPU models")
            save_single_file(ours, path)
            self._single_file_written = True
        return path

    def close_comfy(self) -> None:
        if self._comfy is not None:
            self._comfy.close()
        self._comfy, self._comfy_dtype = None, None

    def note_load(self, when: str) -> None:
        one, five, fifteen = os.getloadavg()
        self.load_averages.append(f"{when}: {one:.2f} / {five:.2f} / {fifteen:.2f}")

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def models(self) -> tuple[Reference, Any, Refiners | None]:
        """diffusers', our and refiners' SD1.5 on the same tensors (UNet and text encoder in `dtype`, VAE fp32)."""
        if self._models is None:
            gc.collect()  # a previous section's models (Chains hold reference cycles) go before these come
            note = enable_refiners() if self.use_refiners else "skipped (--no-refiners)"
            reference = diffusers_sd15()
            # refiners' key map is traced on the CPU; off the CPU it gets its own copy of the weights
            refiners = None if note else refiners_sd15(reference, self.folder)
            moved = self.device.type != "cpu" or self.dtype != torch.float32
            if moved:
                reference.unet.to(self.device, self.dtype)
                reference.text_encoder.to(self.device, self.dtype)
                reference.autoencoder.to(self.device)
                if refiners is not None:
                    refiners.unet.to(self.device, self.dtype)
                    refiners.text_encoder.to(self.device, self.dtype)
                    refiners.autoencoder.to(self.device)
            ours = ours_sd15(reference)  # on the reference's tensors, wherever they are
            ours.unet.to(self.device, self.dtype)  # no-ops where the tensors are already shared
            ours.text_encoder.to(self.device, self.dtype)
            ours.autoencoder.to(self.device)
            if note:
                self.notes.append(f"refiners: {note}")
            self._models = (reference, ours, refiners)
        return self._models

    def free_models(self) -> None:
        self._models = None
        gc.collect()

    def randn(self, *shape: int, seed: int, dtype: torch.dtype | None = None) -> Tensor:
        tensor = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
        return tensor.to(self.device, dtype or self.dtype)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time(self, candidates: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> Timing:
        """Medians of each candidate's wall and CPU time; every repeat runs all of them, the order rotating."""
        names = list(candidates)
        wall: dict[str, list[float]] = {name: [] for name in names}
        cpu: dict[str, list[float]] = {name: [] for name in names}
        with torch.no_grad():
            for _ in range(warmup):
                for name in names:
                    candidates[name]()
            self.synchronize()
            for repeat in range(repeats):
                order = names[repeat % len(names) :] + names[: repeat % len(names)]
                for name in order:
                    gc.collect()
                    start, start_cpu = time.perf_counter(), time.process_time()
                    result = candidates[name]()
                    self.synchronize()
                    if isinstance(result, RemoteTiming):  # another process: it timed itself
                        wall[name].append(result.wall)
                        cpu[name].append(result.cpu)
                        continue
                    wall[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
        return Timing(
            {name: statistics.median(values) for name, values in wall.items()},
            wall,
            {} if self.cuda else {name: statistics.median(values) for name, values in cpu.items()},
        )


@dataclass
class Section:
    name: str
    run: Callable[[Bench], list[Row]]
    default: bool = True
    description: str = ""


def max_difference(a: Tensor, b: Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


def parity(candidates: dict[str, Callable[[], Any]], against: str = DIFFUSERS) -> str:
    """Max abs difference of each implementation's output from `against`'s (run once, outside timing)."""
    with torch.no_grad():
        outputs = {
            name: first(run.output() if isinstance(run, ComfyCandidate) else run())
            for name, run in candidates.items()
        }
    return ", ".join(
        f"{name} vs {against} max|Δ| {max_difference(value, outputs[against]):.1e}"
        for name, value in outputs.items()
        if name != against
    )


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of the tensors that ops create while it is active (storages counted once, views free).

    What a step allocates for its activations, independent of the allocator: glibc keeps freed memory
    for reuse, so the process' RSS barely moves from one step to the next. Buffers that kernels allocate
    internally (e.g. oneDNN's reordered weights) are not tensors and are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._references: dict[int, int] = {}

    def _release(self, key: int, size: int) -> None:
        self._references[key] -= 1
        if self._references[key] == 0:
            del self._references[key]
            self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0:
                continue
            if key not in self._references:
                self._references[key] = 0
                self.live += size
                self.peak = max(self.peak, self.live)
            self._references[key] += 1
            weakref.finalize(tensor, self._release, key, size)
        return out


# -- SD1.5 compute sections --------------------------------------------------------------------------


def unet_inputs(bench: Bench, latent: int, batch: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    x = bench.randn(batch, 4, latent, latent, seed=1)
    timestep = torch.tensor([999.0], device=bench.device)
    context = bench.randn(batch, 77, 768, seed=11)
    return x, timestep, context


def ours_unet_step(unet: Any, x: Tensor, timestep: Tensor, context: Tensor) -> Callable[[], Tensor]:
    def run() -> Tensor:
        unet.set_timestep(timestep)
        unet.set_clip_text_embedding(context)
        return unet(x)

    return run


def unet_candidates(
    bench: Bench, latent: int, batch: int = 2, refiners: bool = True
) -> dict[str, Callable[[], Any]]:
    reference, ours, theirs = bench.models()
    x, timestep, context = unet_inputs(bench, latent, batch)
    candidates: dict[str, Callable[[], Any]] = {
        OURS: ours_unet_step(ours.unet, x, timestep, context),
        DIFFUSERS: lambda: reference.unet(x, timestep, context).sample,
    }
    if refiners and theirs is not None:
        candidates[REFINERS] = ours_unet_step(theirs.unet, x, timestep, context)
    return candidates


def with_comfy(
    bench: Bench, candidates: dict[str, Callable[[], Any]], what: str, **inputs: Tensor
) -> dict[str, Callable[[], Any]]:
    """`candidates` plus ComfyUI's call of `what` on the same inputs (when FLUXION_BENCH_COMFYUI names a checkout)."""
    worker = bench.comfy()
    if worker is None:
        return candidates
    worker.set_inputs(**inputs)
    return {**candidates, COMFYUI: ComfyCandidate(worker, what)}


def unet_section(bench: Bench) -> list[Row]:
    latent = bench.sizes.unet_latent
    candidates = unet_candidates(bench, latent)
    x, timestep, context = unet_inputs(bench, latent)
    candidates = with_comfy(bench, candidates, "unet", x=x, timestep=timestep, context=context)
    check = parity(candidates)
    flops = count_flops(candidates[OURS])
    timing = bench.time(candidates, bench.sizes.repeats)
    row = timing.row("UNet", f"step, batch 2, {latent}² latent", check)
    row.flops = flops
    return [row]


def text_section(bench: Bench) -> list[Row]:
    reference, ours, refiners = bench.models()
    tokens = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(2)).to(bench.device)
    candidates: dict[str, Callable[[], Any]] = {
        OURS: lambda: ours.text_encoder(tokens),
        DIFFUSERS: lambda: reference.text_encoder(tokens).last_hidden_state,
    }
    if refiners is not None:
        candidates[REFINERS] = lambda: refiners.text_encoder(tokens)
    candidates = with_comfy(bench, candidates, "clip", tokens=tokens)
    check = parity(candidates)
    flops = count_flops(candidates[OURS])
    timing = bench.time(candidates, max(bench.sizes.repeats, 3) * 2)
    row = timing.row("CLIP-L", "text encode, batch 2 × 77", check)
    row.flops = flops
    return [row]


def decode_section(bench: Bench) -> list[Row]:
    reference, ours, refiners = bench.models()
    latent = bench.sizes.vae_latent
    latents = bench.randn(1, 4, latent, latent, seed=3, dtype=torch.float32)
    scale = ours.autoencoder.scaling_factor
    candidates: dict[str, Callable[[], Any]] = {
        OURS: lambda: ours.autoencoder.decode(latents),
        DIFFUSERS: lambda: reference.autoencoder.decode(latents / scale).sample,
    }
    if refiners is not None:
        candidates[REFINERS] = lambda: refiners.autoencoder.decode(latents)
    candidates = with_comfy(bench, candidates, "vae", latents=latents)
    check = parity(candidates)
    flops = count_flops(candidates[OURS])
    timing = bench.time(candidates, bench.sizes.repeats)
    row = timing.row("VAE", f"decode {latent}² latent → {latent * 8}² (fp32)", check)
    row.flops = flops
    return [row]


def pipeline_section(bench: Bench) -> list[Row]:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from tests.support.tiny_sd import clip_tokenizer

    reference, ours, refiners = bench.models()
    size, steps = bench.sizes.pipeline_image, bench.sizes.pipeline_steps
    tokenizer = clip_tokenizer(bench.folder / "clip-tokenizer")
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
    if refiners is not None and not bench.cuda:
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
    timing = bench.time(candidates, bench.sizes.pipeline_repeats)
    return [timing.row("pipeline", f"txt2img {steps} DDIM steps, {size}², CFG")]


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


def base_copy_of_attention(unet: Any) -> Any:
    """A second UNet of ours on the same tensors, except the attention projections: copies of the base weights.

    It stays the LoRA-free model while the LoRA manager fuses into the shared tensors in place, so a fused
    step and a LoRA-free step can run in one interleaved loop (the copies are a few hundred MiB).
    """
    from fluxion import layers as fl
    from foundationals.latent_diffusion.unet import UNet

    copied = {
        id(module.weight) for attention in unet.layers(fl.Attention) for module in attention.layers(fl.Linear)
    }
    state = {
        key: value.detach().clone() if id(value) in copied else value
        for key, value in unet.state_dict(keep_vars=True).items()
    }
    twin = UNet(unet.config, device="meta")
    twin.load_state_dict({key: value.detach() for key, value in state.items()}, strict=True, assign=True)
    return twin


def lora_section(bench: Bench) -> list[Row]:
    """0/1/3 LoRAs unfused and fused, ours vs diffusers (peft), with our LoRA-free UNet in every loop."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from foundationals.latent_diffusion.adapters.lora import SDLoraManager

    reference, ours, _ = bench.models()
    latent = bench.sizes.lora_latent
    folder = bench.folder / "loras"
    folder.mkdir(exist_ok=True)
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
    base = base_copy_of_attention(ours.unet)
    x, timestep, context = unet_inputs(bench, latent)
    no_lora = ours_unet_step(base, x, timestep, context)
    candidates = unet_candidates(bench, latent, refiners=False)
    manager = SDLoraManager.for_models(ours.unet)
    repeats = max(1, bench.sizes.repeats - 1)
    timing = bench.time({**candidates, "ours, 0 LoRA": no_lora}, repeats)
    rows = [timing.row("LoRA", f"UNet step, 0 LoRA ({latent}²)", parity(candidates), only=(OURS, DIFFUSERS))]
    for count in (1, 3):
        names = [f"lora{index}" for index in range(count)]
        for index in range(len(manager.names), count):
            manager.add_loras(names[index], paths[index])
            pipe.load_lora_weights(str(folder), weight_name=paths[index].name, adapter_name=names[index])
        pipe.set_adapters(names, [1.0] * count)
        check = parity(candidates)
        timing = bench.time({**candidates, "ours, 0 LoRA": no_lora}, repeats)
        rows.append(timing.row("LoRA", f"UNet step, {count} LoRA unfused", check, only=(OURS, DIFFUSERS)))
        bench.notes.append(
            f"{count} LoRA unfused: ours / our LoRA-free UNet in the same loop "
            f"{timing.medians[OURS] / timing.medians['ours, 0 LoRA']:.3f}"
        )
        # Fused: ours fuses into the tensors it shares with diffusers; diffusers runs on those same fused
        # weights with its LoRA layers bypassed (`disable_lora`), which is what its fused step computes
        # (peft's merged layers run the base layer only). Our LoRA-free twin runs in the same loop.
        their_fused = diffusers_fused_output(pipe, names, candidates[DIFFUSERS], reference)
        originals = {id(site): site.layer.weight.detach().clone() for site in manager._sites.values()}
        manager.fuse()
        pipe.disable_lora()
        try:
            same_layout = all(
                (weight := site.layer.weight).dtype == originals[id(site)].dtype
                and weight.stride() == originals[id(site)].stride()
                and weight.is_contiguous()
                for site in manager._sites.values()
            )
            bench.notes.append(
                f"{count} LoRA fused: {len(originals)} fused weights, same dtype, strides and contiguity as the "
                f"base weights: {'yes' if same_layout else 'NO'}"
            )
            del originals
            ours_fused = first(candidates[OURS]())
            check = f"ours fused vs diffusers fused (fuse_lora) max|Δ| {max_difference(ours_fused, their_fused):.1e}"
            timing = bench.time(
                {**candidates, "ours, 0 LoRA": no_lora}, repeats + 2
            )  # the ≤ 1.02 target needs more samples
        finally:
            pipe.enable_lora()
            manager.unfuse()
        rows.append(timing.row("LoRA", f"UNet step, {count} LoRA fused", check, only=(OURS, DIFFUSERS)))
        bench.notes.append(
            f"{count} LoRA fused: ours / our LoRA-free UNet in the same loop "
            f"{timing.medians[OURS] / timing.medians['ours, 0 LoRA']:.3f} (target ≤ 1.02); diffusers' column: "
            "its UNet on the same fused tensors with the LoRA layers bypassed"
        )
    manager.clear()
    pipe.unload_lora_weights()
    return rows


def regional_section(bench: Bench) -> list[Row]:
    """A LoRA on half the image (blend / keep) against the plain model and the same LoRA everywhere: a short run."""
    from foundationals.latent_diffusion.adapters.lora import SDLoraManager
    from foundationals.latent_diffusion.adapters.regional import Region, latent_region_mask
    from foundationals.latent_diffusion.model_patch import SamplingRun, patched
    from foundationals.latent_diffusion.sampling import Conditioning
    from foundationals.latent_diffusion.solvers import make_solver

    reference, ours, _ = bench.models()
    latent, steps = bench.sizes.lora_latent, 2
    folder = bench.folder / "loras"
    folder.mkdir(exist_ok=True)
    path = write_kohya_loras(reference, folder, 1)[0]
    context = bench.randn(1, 77, 768, seed=11)
    positive, negative = Conditioning(context), Conditioning(context.flip(1))
    mask = torch.zeros(latent * 8, latent * 8)
    mask[:, : latent * 4] = 1.0

    class Lora:
        label = "LoRA"

        def __init__(self, region: str | None = None, keep: bool = False) -> None:
            self.region, self.keep = region, keep

        def apply(self, model: Any, run: SamplingRun | None) -> Callable[[], None]:
            assert run is not None
            manager = SDLoraManager.for_models(model.unet)
            manager.add_loras("lora", path)
            if self.region is None:
                return manager.clear
            region = Region(self.region, latent_region_mask(mask, latent, latent), keep_outside=self.keep)
            manager.set_region("lora", region.name)
            run.regions.append(region)

            def undo() -> None:
                run.regions.remove(region)
                manager.clear()

            return undo

    def sampling(patches: list[Any]) -> Callable[[], Tensor]:
        def run() -> Tensor:
            sampling_run = SamplingRun(steps, 0, latent, latent, 1, uses_guidance=True)
            solver = make_solver("ddim", steps, "normal", device=bench.device)
            with patched(ours, patches, sampling_run):
                return ours.sample(
                    (1, 4, latent, latent), positive, negative, solver, 7.5, 0, run=sampling_run
                )

        return run

    candidates = {
        "no LoRA": sampling([]),
        "LoRA everywhere (unfused)": sampling([Lora()]),
        "regional LoRA, blend": sampling([Lora("left")]),
        "regional LoRA, keep": sampling([Lora("left", keep=True)]),
    }
    plain = candidates["no LoRA"]()
    kept = candidates["regional LoRA, keep"]()
    right = (..., slice(latent // 2, None))
    note = f"keep: outside the mask equals no LoRA exactly: {torch.equal(kept[right], plain[right])}"
    timing = bench.time(candidates, max(1, bench.sizes.repeats - 1))
    base = timing.medians["no LoRA"]
    rows = [
        Row(
            "regional LoRA",
            f"{steps} DDIM steps, {latent}², CFG: {name}",
            {OURS: timing.medians[name]},
            samples={OURS: timing.samples[name]},
            cpu={OURS: timing.cpu[name]} if name in timing.cpu else {},
        )
        for name in candidates
    ]
    bench.notes.append(
        "regional LoRA (ours only; diffusers has none): time / no-LoRA run in the same loop: "
        + ", ".join(f"{name} {timing.medians[name] / base:.2f}×" for name in candidates)
        + f" (blend: 2 UNet passes per step, keep: 3); {note}"
    )
    return rows


def diffusers_fused_output(
    pipe: Any, names: list[str], run: Callable[[], Any], reference: Reference
) -> Tensor:
    """diffusers' output with `fuse_lora` (once), the shared base weights restored bit for bit afterwards."""
    saved = {
        name: module.weight.detach().clone()
        for name, module in reference.unet.named_modules()
        if hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Linear)
    }
    pipe.fuse_lora(components=["unet"], adapter_names=names)
    try:
        with torch.no_grad():
            output = first(run())
    finally:
        pipe.unfuse_lora(components=["unet"])
        modules = dict(reference.unet.named_modules())
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].base_layer.weight.copy_(weight)  # peft's unmerge subtracts: not bit-exact
    return output


# -- ControlNet and IP-Adapter overhead --------------------------------------------------------------


def controlnet_section(bench: Bench) -> list[Row]:
    """A UNet step with and without one full-size SD1.5 ControlNet: ours vs diffusers' ControlNetModel + UNet."""
    from foundationals.latent_diffusion.adapters.controlnet import ControlNetAdapter, ControlNetBranch
    from foundationals.latent_diffusion.model_config import SD15_UNET
    from foundationals.latent_diffusion.unet import DownBlocks
    from tests.support.tiny_control import diffusers_controlnet, ours_from_diffusers_controlnet

    reference, ours, _ = bench.models()
    hint_channels = (16, 32, 96, 256)
    theirs = diffusers_controlnet(SD15_UNET, hint_channels=hint_channels)
    if bench.device.type != "cpu" or bench.dtype != torch.float32:
        theirs.to(bench.device, bench.dtype)
    controlnet = ours_from_diffusers_controlnet(theirs, SD15_UNET, hint_channels=hint_channels)
    latent = bench.sizes.unet_latent
    x, timestep, context = unet_inputs(bench, latent)
    image = torch.rand(
        1, latent * 8, latent * 8, 3, generator=torch.Generator().manual_seed(5)
    )  # ComfyUI IMAGE
    hint = image.movedim(-1, 1).repeat(2, 1, 1, 1).to(bench.device, bench.dtype)
    candidates = unet_candidates(bench, latent, refiners=False)
    branch = ControlNetBranch(controlnet, image.to(bench.device, bench.dtype), strength=1.0)

    def ours_controlled() -> Tensor:
        adapter = ControlNetAdapter(ours.unet.ensure_find(DownBlocks), branch).inject()
        try:
            return candidates[OURS]()
        finally:
            adapter.eject()

    def diffusers_controlled() -> Tensor:
        down, middle = theirs(
            x, timestep, encoder_hidden_states=context, controlnet_cond=hint, return_dict=False
        )
        return reference.unet(
            x, timestep, context, down_block_additional_residuals=down, mid_block_additional_residual=middle
        ).sample

    controlled = {"ours + ControlNet": ours_controlled, "diffusers + ControlNet": diffusers_controlled}
    check = parity({OURS: ours_controlled, DIFFUSERS: diffusers_controlled})
    timing = bench.time({**candidates, **controlled}, max(1, bench.sizes.repeats - 1))
    with_control = Row(
        "ControlNet",
        f"UNet step + 1 ControlNet, {latent}² (hint {latent * 8}²)",
        {OURS: timing.medians["ours + ControlNet"], DIFFUSERS: timing.medians["diffusers + ControlNet"]},
        samples={
            OURS: timing.samples["ours + ControlNet"],
            DIFFUSERS: timing.samples["diffusers + ControlNet"],
        },
        note=check,
        cpu={
            OURS: timing.cpu.get("ours + ControlNet", 0.0),
            DIFFUSERS: timing.cpu.get("diffusers + ControlNet", 0.0),
        }
        if timing.cpu
        else {},
    )
    overhead = {
        name: timing.medians[f"{name} + ControlNet"] / timing.medians[name] for name in (OURS, DIFFUSERS)
    }
    bench.notes.append(
        "ControlNet overhead (step with / without, same loop): "
        + ", ".join(f"{name} {value:.3f}×" for name, value in overhead.items())
    )
    return [
        timing.row("ControlNet", f"UNet step, no ControlNet ({latent}²)", only=(OURS, DIFFUSERS)),
        with_control,
    ]


def ip_adapter_section(bench: Bench) -> list[Row]:
    """A UNet step with and without an IP-Adapter (base, 4 tokens): ours vs diffusers' load_ip_adapter weights."""
    from diffusers import UNet2DConditionModel

    from foundationals.clip.config import IMAGE_PRESETS
    from foundationals.latent_diffusion.adapters.ip_adapter import ip_adapter_from_state_dict
    from tests.support.tiny_ip_adapter import cross_attention_widths, tencent_ip_adapter

    reference, ours, _ = bench.models()
    latent = bench.sizes.unet_latent
    # a second diffusers UNet on the same tensors carries the IP-Adapter: the first stays unadapted
    with torch.device("meta"):
        adapted: Any = UNet2DConditionModel.from_config(reference.unet.config)
    adapted.load_state_dict(reference.unet.state_dict(), strict=True, assign=True)
    adapted.eval()
    weights = tencent_ip_adapter(
        "base", cross_attention_widths(reference.unet), 768, image_config=IMAGE_PRESETS["vit_h"], seed=6
    )
    adapted._load_ip_adapter_weights([weights])
    if bench.device.type != "cpu" or bench.dtype != torch.float32:
        adapted.to(bench.device, bench.dtype)
    for processor in adapted.attn_processors.values():
        if hasattr(processor, "scale"):
            processor.scale = [0.8]
    adapter = ip_adapter_from_state_dict(
        {f"{group}.{key}": value for group, items in weights.items() for key, value in items.items()},
        "bench",
        device=bench.device,
        dtype=bench.dtype,
    )
    x, timestep, context = unet_inputs(bench, latent)
    embeds = bench.randn(2, 1, IMAGE_PRESETS["vit_h"].projection_dim, seed=7)
    tokens = adapter.project(embeds[:, 0])
    candidates = unet_candidates(bench, latent, refiners=False)

    def ours_adapted() -> Tensor:
        injection = adapter.inject(ours.unet)
        try:
            injection.set_tokens(tokens)
            injection.set_scale(0.8)
            return candidates[OURS]()
        finally:
            injection.eject()

    def diffusers_adapted() -> Tensor:
        return adapted(x, timestep, context, added_cond_kwargs={"image_embeds": [embeds]}).sample

    check = parity({OURS: ours_adapted, DIFFUSERS: diffusers_adapted})
    names = {"ours + IP-Adapter": ours_adapted, "diffusers + IP-Adapter": diffusers_adapted}
    timing = bench.time({**candidates, **names}, max(1, bench.sizes.repeats - 1))
    row = Row(
        "IP-Adapter",
        f"UNet step + IP-Adapter (4 image tokens), {latent}²",
        {OURS: timing.medians["ours + IP-Adapter"], DIFFUSERS: timing.medians["diffusers + IP-Adapter"]},
        samples={
            OURS: timing.samples["ours + IP-Adapter"],
            DIFFUSERS: timing.samples["diffusers + IP-Adapter"],
        },
        note=check + " (ours projects the image embedding once per run, diffusers inside every UNet call)",
        cpu={OURS: timing.cpu["ours + IP-Adapter"], DIFFUSERS: timing.cpu["diffusers + IP-Adapter"]}
        if timing.cpu
        else {},
    )
    overhead = {
        name: timing.medians[f"{name} + IP-Adapter"] / timing.medians[name] for name in (OURS, DIFFUSERS)
    }
    bench.notes.append(
        "IP-Adapter overhead (step with / without, same loop): "
        + ", ".join(f"{name} {value:.3f}×" for name, value in overhead.items())
    )
    return [timing.row("IP-Adapter", f"UNet step, no IP-Adapter ({latent}²)", only=(OURS, DIFFUSERS)), row]


# -- SDXL ----------------------------------------------------------------------------------------------


def sdxl_section(bench: Bench) -> list[Row]:
    """Full-size SDXL base UNet, one set of tensors shared by diffusers and ours (refiners skipped: memory)."""
    from diffusers import UNet2DConditionModel

    from foundationals.formats.diffusers import diffusers_unet_key_map
    from foundationals.latent_diffusion.model_config import SDXL_BASE_UNET
    from foundationals.latent_diffusion.unet import UNet
    from tests.support.tiny_sdxl import sdxl_unet_kwargs

    bench.free_models()  # SD1.5 (≈ 4 GiB) and SDXL's UNet (≈ 9.6 GiB fp32) do not fit together in 13 GB
    with torch.device("meta"):
        reference: Any = UNet2DConditionModel(**{**sdxl_unet_kwargs(SDXL_BASE_UNET), "sample_size": 128})
    tensors = random_weights(reference, seed=20)
    if bench.device.type != "cpu" or bench.dtype != torch.float32:
        tensors = {key: value.to(bench.device, bench.dtype) for key, value in tensors.items()}
    reference.load_state_dict(tensors, strict=True, assign=True)
    reference.eval()
    del tensors
    unet = UNet(SDXL_BASE_UNET, device="meta")
    state = reference.state_dict()
    unet.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_unet_key_map(unet).items()}, assign=True
    )
    del state
    weight_mib = sum(p.numel() * p.element_size() for p in reference.parameters()) / 2**20
    latent = bench.sizes.sdxl_latent
    x = bench.randn(2, 4, latent, latent, seed=21)
    timestep = torch.tensor([999.0], device=bench.device)
    context = bench.randn(2, 77, 2048, seed=22)
    pooled = bench.randn(2, 1280, seed=23)
    size = float(latent * 8)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * 2, device=bench.device, dtype=bench.dtype)

    def run_ours() -> Tensor:
        unet.set_timestep(timestep)
        unet.set_clip_text_embedding(context)
        unet.set_pooled_text_embedding(pooled)
        unet.set_time_ids(time_ids)
        return unet(x)

    def run_diffusers() -> Tensor:
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return reference(x, timestep, context, added_cond_kwargs=added).sample

    candidates = {OURS: run_ours, DIFFUSERS: run_diffusers}
    check = parity(candidates)
    timing = bench.time(candidates, max(1, bench.sizes.repeats - 1))
    bench.notes.append(
        f"SDXL: one set of UNet tensors ({weight_mib:,.0f} MiB) shared by diffusers and ours; refiners skipped "
        "(its key map is traced on a second, materialised SDXL UNet: one more copy does not fit in 13 GB)"
    )
    return [timing.row("SDXL", f"UNet step, batch 2, {latent}² latent ({latent * 8}² image)", check)]


# -- Scaling, profile, compiled path ------------------------------------------------------------------


def measure_memory(bench: Bench, run: Callable[[], Any]) -> float:
    """Peak memory (MiB) one call adds: its tensors' peak on CPU, the allocator's peak on CUDA."""
    gc.collect()
    with torch.no_grad():
        if bench.cuda:
            bench.synchronize()
            torch.cuda.reset_peak_memory_stats(bench.device)
            base = torch.cuda.memory_allocated(bench.device)
            run()
            bench.synchronize()
            return (torch.cuda.max_memory_allocated(bench.device) - base) / 2**20
        tracker = PeakTensorMemory()
        with tracker:
            output = run()
        del output
        return tracker.peak / 2**20


def scaling_section(bench: Bench) -> list[Row]:
    """UNet step time and peak memory vs latent size (batch 2) and batch (32² latent), ours vs diffusers."""
    sizes = bench.sizes
    configs = [(latent, 2) for latent in sizes.scaling_latents]
    configs += [(sizes.unet_latent, batch) for batch in sizes.scaling_batches if batch != 2]
    lines = [
        "| latent | batch | ours step | diffusers step | ours/diffusers | ours peak memory | diffusers peak memory |",
        "|---|---|---|---|---|---|---|",
    ]
    for latent, batch in sorted(configs, key=lambda c: (c[1] != 2, c[0], c[1])):
        candidates = unet_candidates(bench, latent, batch, refiners=False)
        memory = {name: measure_memory(bench, run) for name, run in candidates.items()}
        timing = bench.time(candidates, 1, warmup=0)  # the memory run was the warm-up
        ours, theirs = timing.medians[OURS], timing.medians[DIFFUSERS]
        lines.append(
            f"| {latent}² | {batch} | {ours:.3f} s | {theirs:.3f} s | {ours / theirs:.3f} | "
            f"{memory[OURS]:,.0f} MiB | {memory[DIFFUSERS]:,.0f} MiB |"
        )
        print(f"  scaling {latent}² × {batch}: {ours:.3f} s / {theirs:.3f} s", flush=True)
    what = (
        "peak bytes of the tensors the step creates (activations)"
        if not bench.cuda
        else "CUDA allocator peak"
    )
    bench.extra["Scaling: SD1.5 UNet step vs latent size and batch"] = [
        f"One timed run per size and implementation, after the memory-measuring run (the warm-up); peak memory: {what} (the weights are not counted).",
        "",
        *lines,
    ]
    return []


def profile_section(bench: Bench, top: int = 14) -> list[Row]:
    """Where a UNet step spends its time: torch.profiler, top ops by self CPU time, ours next to diffusers."""
    from torch.profiler import ProfilerActivity, profile

    latent = bench.sizes.unet_latent
    candidates = unet_candidates(bench, latent, refiners=False)
    tables: dict[str, dict[str, tuple[float, int]]] = {}
    totals: dict[str, float] = {}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bench.cuda else [])
    with torch.no_grad():
        for run in candidates.values():
            run()  # warm-up
        for _ in range(2):  # keep each implementation's least disturbed of two profiled runs
            for name, run in candidates.items():
                with profile(activities=activities) as profiler:
                    run()
                    bench.synchronize()
                table = {
                    event.key: (event.self_cpu_time_total / 1e3, event.count)
                    for event in profiler.key_averages()
                }
                total = sum(value for value, _ in table.values())
                if total < totals.get(name, float("inf")):
                    tables[name], totals[name] = table, total
    ours = sorted(tables[OURS].items(), key=lambda item: -item[1][0])[:top]
    lines = [
        "| op | ours self CPU | % of ours | calls | diffusers self CPU | % of diffusers | calls |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, (milliseconds, calls) in ours:
        theirs, their_calls = tables[DIFFUSERS].get(key, (0.0, 0))
        lines.append(
            f"| `{key}` | {milliseconds:,.1f} ms | {100 * milliseconds / totals[OURS]:.1f} % | {calls} | "
            f"{theirs:,.1f} ms | {100 * theirs / totals[DIFFUSERS]:.1f} % | {their_calls} |"
        )
    lines.append(
        f"| total (all ops) | {totals[OURS]:,.1f} ms | 100 % | {sum(c for _, c in tables[OURS].values())} | "
        f"{totals[DIFFUSERS]:,.1f} ms | 100 % | {sum(c for _, c in tables[DIFFUSERS].values())} |"
    )
    bench.extra[f"Profile: one SD1.5 UNet step, batch 2, {latent}² latent"] = [
        "torch.profiler (CPU activities), the less disturbed of two profiled steps after a warm-up; self "
        "time per op, summed over calls. "
        "Both implementations spend their time in the same kernels (oneDNN convolutions, MKL matmuls, "
        "the fused attention kernel, group norms): the eager step cannot get much below diffusers' without "
        "changing the kernels themselves.",
        "",
        *lines,
    ]
    return []


def channels_last_section(bench: Bench) -> list[Row]:
    """Opt-in NHWC weights (`fluxion.compile.channels_last`): UNet step and VAE decode vs diffusers (NCHW)."""
    from fluxion.compile import channels_last

    reference, ours, _ = bench.models()
    latent = bench.sizes.unet_latent
    candidates = unet_candidates(bench, latent, refiners=False)
    latents = bench.randn(1, 4, bench.sizes.vae_latent, bench.sizes.vae_latent, seed=3, dtype=torch.float32)
    scale = ours.autoencoder.scaling_factor
    decoders: dict[str, Callable[[], Any]] = {
        OURS: lambda: ours.autoencoder.decode(latents),
        DIFFUSERS: lambda: reference.autoencoder.decode(latents / scale).sample,
    }
    changed = channels_last(ours.unet) + channels_last(ours.autoencoder)
    try:
        unet_check, decode_check = parity(candidates), parity(decoders)
        unet_timing = bench.time(candidates, max(1, bench.sizes.repeats - 1))
        decode_timing = bench.time(decoders, max(1, bench.sizes.repeats - 1))
    finally:
        channels_last(ours.unet, enabled=False)
        channels_last(ours.autoencoder, enabled=False)
    bench.notes.append(
        f"channels-last (opt-in): {changed} convolution weights stored NHWC in our UNet and autoencoder "
        "(copies: they stop sharing storage with diffusers' NCHW tensors); diffusers stays NCHW"
    )
    return [
        unet_timing.row(
            "opt-in NHWC", f"UNet step, batch 2, {latent}² latent, channels-last weights", unet_check
        ),
        decode_timing.row(
            "opt-in NHWC", f"VAE decode {bench.sizes.vae_latent}² latent, channels-last weights", decode_check
        ),
    ]


def compiled_section(bench: Bench) -> list[Row]:
    """Opt-in torch.compile path (`foundationals.latent_diffusion.unet.compile_unet`) vs eager, both vs diffusers."""
    from fluxion.compile import uncompile
    from foundationals.latent_diffusion.unet import compile_unet

    reference, ours, _ = bench.models()
    latent = bench.sizes.unet_latent
    candidates = unet_candidates(bench, latent, refiners=False)
    eager = first(candidates[OURS]())
    start = time.perf_counter()
    compile_unet(ours.unet)
    try:
        with torch.no_grad():
            compiled = first(candidates[OURS]())
        compile_seconds = time.perf_counter() - start
        check = f"ours compiled vs ours eager max|Δ| {max_difference(compiled, eager):.1e}, " + parity(
            candidates
        )
        timing = bench.time(candidates, max(1, bench.sizes.repeats - 1))
    finally:
        uncompile(ours.unet)
    bench.notes.append(f"compiled: first call (compilation) {compile_seconds:.0f} s")
    return [
        timing.row("compiled", f"UNet step, batch 2, {latent}² latent: ours compiled, diffusers eager", check)
    ]


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


def load_section(bench: Bench) -> list[Row]:
    rows, notes = load_rows(bench.folder, 1 if bench.sizes is QUICK else 2)
    bench.notes.extend(notes)
    return rows


# -- Issue 22: the machine's ceiling, bf16, training-free accelerations -------------------------------


def ceiling_section(bench: Bench) -> list[Row]:
    """The machine's own limit: GFLOP/s of a 4096³ matmul and a 320-channel 3×3 conv, fp32 and bf16."""
    if bench.cuda:
        bench.notes.append("ceiling: measured on CPUs only")
        return []
    results = measure_ceiling(quick=bench.sizes is QUICK)
    bench.ceiling = {
        name: max(results[f"matmul {name}"], results[f"conv {name}"]) for name in ("fp32", "bf16")
    }
    size = int(results["matmul size"])
    lines = [
        "| kernel | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |",
        "|---|---|---|---|",
        f"| matmul {size}³ | {results['matmul fp32']:.0f} | {results['matmul bf16']:.0f} | "
        f"{results['matmul bf16'] / results['matmul fp32']:.2f} |",
        f"| conv 3×3, 320 → 320 channels, 2×320×64×64 | {results['conv fp32']:.0f} | {results['conv bf16']:.0f} | "
        f"{results['conv bf16'] / results['conv fp32']:.2f} |",
    ]
    bench.extra["Machine ceiling"] = [
        f"Best of a few runs each, torch threads = {torch.get_num_threads()}. The 'GFLOP/s' column of the main "
        "table is ours' FLOPs (counted with torch.utils.flop_counter on one call: matmuls, convolutions, "
        "attention) over ours' median time, and its percentage is of the row dtype's ceiling (the faster of the two "
        "kernels below).",
        "",
        *lines,
    ]
    return []


def bf16_section(bench: Bench) -> list[Row]:
    """bf16 UNet and text encoder (VAE fp32): ours vs diffusers vs ComfyUI in bf16, vs ours in fp32, and the
    deviation of a bf16 txt2img image from the fp32 one."""
    if bench.cuda:
        bench.notes.append("bf16 section: CPU only (on CUDA run the whole benchmark with --dtype)")
        return []
    bench.write_single_file()  # before the models go: ComfyUI loads our fp32 weights from it
    bench.free_models()
    reference = diffusers_sd15()
    ours32 = ours_sd15(reference)
    size, steps = 8 * bench.sizes.unet_latent, bench.sizes.pipeline_steps
    prompt, negative = "a red fox in the snow", "blurry"
    with torch.no_grad():
        image32 = ours32.text_to_image(prompt, negative, width=size, height=size, steps=steps, seed=0)
    reference.unet.to(torch.bfloat16)
    reference.text_encoder.to(torch.bfloat16)
    ours16 = ours_sd15(reference)  # on diffusers' bf16 tensors; the VAE stays fp32 (shared)
    latent = bench.sizes.unet_latent
    x = bench.randn(2, 4, latent, latent, seed=1, dtype=torch.float32)
    timestep = torch.tensor([999.0])
    context = bench.randn(2, 77, 768, seed=11, dtype=torch.float32)
    x16, context16 = x.to(torch.bfloat16), context.to(torch.bfloat16)
    tokens = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(2))
    unet: dict[str, Callable[[], Any]] = {
        OURS: ours_unet_step(ours16.unet, x16, timestep, context16),
        DIFFUSERS: lambda: reference.unet(x16, timestep, context16).sample,
    }
    text: dict[str, Callable[[], Any]] = {
        OURS: lambda: ours16.text_encoder(tokens),
        DIFFUSERS: lambda: reference.text_encoder(tokens).last_hidden_state,
    }
    worker = bench.comfy("bf16", force_compute=True)
    if worker is not None:
        worker.set_inputs(x=x, timestep=timestep, context=context, tokens=tokens)
        unet[COMFYUI] = ComfyCandidate(worker, "unet")
        text[COMFYUI] = ComfyCandidate(worker, "clip")
    fp32_step = ours_unet_step(ours32.unet, x, timestep, context)
    unet_check, text_check = parity(unet), parity(text)
    with torch.no_grad():
        exact = fp32_step()
        rounded = unet[OURS]().float()
    unet_timing = bench.time({**unet, "ours fp32": fp32_step}, bench.sizes.repeats)
    text_timing = bench.time(
        {**text, "ours fp32": lambda: ours32.text_encoder(tokens)}, bench.sizes.repeats * 2
    )
    rows = [
        unet_timing.row("bf16", f"UNet step, batch 2, {latent}² latent (bf16)", unet_check, only=tuple(unet)),
        text_timing.row("bf16", "CLIP-L text encode, batch 2 × 77 (bf16)", text_check, only=tuple(text)),
    ]
    rows[0].flops, rows[0].dtype = count_flops(unet[OURS]), "bf16"
    rows[1].flops, rows[1].dtype = count_flops(text[OURS]), "bf16"
    policy: dict[str, float] = {}
    if worker is not None:  # ComfyUI as it runs with --bf16-unet on a CPU: bf16 weights, fp32 compute
        worker = bench.comfy("bf16", force_compute=False)
        assert worker is not None
        worker.set_inputs(x=x, timestep=timestep, context=context, tokens=tokens)
        own = bench.time(
            {OURS: unet[OURS], COMFYUI: ComfyCandidate(worker, "unet")}, max(1, bench.sizes.repeats - 1)
        )
        policy = own.medians
    with torch.no_grad():
        image16 = ours16.text_to_image(prompt, negative, width=size, height=size, steps=steps, seed=0)
    deviation = (image16.float() - image32.float()).abs().max().item()
    quality = psnr(image16, image32)
    lines = [
        "| what | ours fp32 | ours bf16 | diffusers bf16 | ComfyUI bf16 | ours bf16 / fp32 | ours/diffusers | ours/ComfyUI |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, timing in (
        (f"UNet step, batch 2, {latent}²", unet_timing),
        ("CLIP-L encode, 2 × 77", text_timing),
    ):
        medians = timing.medians
        comfy = medians.get(COMFYUI)
        lines.append(
            f"| {label} | {medians['ours fp32']:.3f} s | {medians[OURS]:.3f} s | {medians[DIFFUSERS]:.3f} s | "
            + (f"{comfy:.3f} s" if comfy else "—")
            + f" | {medians[OURS] / medians['ours fp32']:.3f} | {medians[OURS] / medians[DIFFUSERS]:.3f} | "
            + (f"{medians[OURS] / comfy:.3f}" if comfy else "—")
            + " |"
        )
    block = [
        "UNet and text encoder in bf16 (weights and compute), VAE fp32; the same tensors for ours and diffusers "
        "(diffusers' models converted, ours on them); ComfyUI loads the same single file with its UNet and text "
        "encoder in bf16 and its manual cast off, so it computes in bf16 too. One interleaved loop per model "
        "(ours fp32 in the same loop).",
        "",
        *lines,
        "",
        f"- UNet output, bf16 vs fp32 (same inputs): max|Δ| {(rounded - exact).abs().max().item():.3g} "
        f"(outputs up to {exact.abs().max().item():.3g})",
        f"- txt2img {size}², {steps} DDIM steps, CFG 7.5: the bf16 image vs the fp32 image (in [0, 1]): max|Δ| "
        f"{deviation:.3g}, PSNR {quality:.1f} dB (random weights: a noise-like image, a harsh case for rounding)",
    ]
    if policy:
        block.append(
            f"- ComfyUI as it runs with `--bf16-unet` on a CPU (its `should_use_bf16` is False there: bf16 weights, "
            f"fp32 compute through its manual cast): UNet step {policy[COMFYUI]:.3f} s vs ours bf16 "
            f"{policy[OURS]:.3f} s (ours/ComfyUI {policy[OURS] / policy[COMFYUI]:.3f})"
        )
    bench.extra["bf16 on this CPU"] = block
    bench.close_comfy()  # the worker's bf16 models go; a later section loads fp32 again
    bench.free_models()
    return rows


def accelerations_section(bench: Bench) -> list[Row]:
    """DeepCache (default) and ToMe (0.5) on the full-size SD1.5 UNet: time to image over a 20-step txt2img run at
    a 64² latent, and the deviation of the image from the exact run's."""
    from foundationals.latent_diffusion.adapters.deep_cache import DeepCachePatch
    from foundationals.latent_diffusion.adapters.token_merging import TokenMergingPatch
    from tests.support.guided import guided_text_to_image

    _, ours, _ = bench.models()
    quick = bench.sizes is QUICK
    latent, steps = (8, 3) if quick else (64, 20)
    size = 8 * latent
    variants: dict[str, list[Any]] = {
        "exact": [],
        "DeepCache (interval 3, depth 1)": [DeepCachePatch(interval=3, depth=1)],
        "ToMe (ratio 0.5)": [TokenMergingPatch(ratio=0.5)],
        "DeepCache + ToMe 0.5": [DeepCachePatch(interval=3, depth=1), TokenMergingPatch(ratio=0.5)],
    }
    if not quick:
        variants.pop("DeepCache + ToMe 0.5")  # one more 20-step run: kept for --quick only
    prompt, negative = "a red fox in the snow", "blurry"

    def make(patches: list[Any], count: int) -> Callable[[], Tensor]:
        return lambda: guided_text_to_image(
            ours, patches, prompt, negative, width=size, height=size, steps=count, guidance_scale=7.5, seed=0
        )

    with torch.no_grad():
        for patches in variants.values():  # warm-up: a 2-step run of each at the same size
            make(patches, 2)()
    images: dict[str, Tensor] = {}
    seconds: dict[str, float] = {}
    cpu: dict[str, float] = {}
    order = list(variants)[1:] + ["exact"]  # the exact run last: it cannot profit from an earlier warm-up
    with torch.no_grad():
        for name in order:
            gc.collect()
            start, start_cpu = time.perf_counter(), time.process_time()
            images[name] = make(variants[name], steps)()
            seconds[name], cpu[name] = time.perf_counter() - start, time.process_time() - start_cpu
            print(f"  acceleration {name}: {seconds[name]:.1f} s", flush=True)
    targets = {"DeepCache (interval 3, depth 1)": 1.8, "ToMe (ratio 0.5)": 1.3}
    lines = [
        "| variant | time to image | speed-up (wall) | speed-up (CPU time) | target | max abs vs exact | PSNR vs exact |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name in variants:
        speed = seconds["exact"] / seconds[name]
        speed_cpu = cpu["exact"] / cpu[name]
        difference = (images[name] - images["exact"]).abs().max().item()
        quality = psnr(images[name], images["exact"])
        target = targets.get(name)
        lines.append(
            f"| {name} | {seconds[name]:.1f} s | {speed:.2f}× | {speed_cpu:.2f}× | "
            + (f"≥ {target}× ({'met' if speed >= target else 'not met'})" if target else "—")
            + f" | {difference:.3g} | "
            + ("exact" if name == "exact" else f"{quality:.1f} dB")
            + " |"
        )
        rows.append(
            Row(
                "acceleration",
                f"txt2img {steps} DDIM steps, {size}², CFG: {name}",
                {OURS: seconds[name]},
                samples={OURS: [seconds[name]]},
                cpu={OURS: cpu[name]},
                note=""
                if name == "exact"
                else f"{speed:.2f}× the exact run, max|Δ| {difference:.3g}, PSNR {quality:.1f} dB",
            )
        )
    bench.extra[f"Accelerations: SD1.5, {steps}-step txt2img at {size}² ({latent}² latent)"] = [
        f"Ours, full-size SD1.5 with random weights, DDIM, CFG 7.5 (batch 2 per UNet pass), seed 0; time to image = "
        "prompt encoding + sampling + VAE decode, one timed run each after a 2-step warm-up of each, the exact run "
        "last; deviation of the decoded image (in [0, 1]) from the exact run's. DeepCache at its default runs the "
        f"full UNet on {len(range(0, steps, 3))} of the {steps} steps and the shallow branch (input blocks 0-1, "
        "output blocks 10-11) on the others. ToMe merges half of the query tokens of the five self-attentions at "
        "the latent's resolution (ComfyUI's TomePatchModel rule). The compile node's path is the 'compiled' row.",
        "",
        *lines,
    ]
    return rows


SECTIONS: list[Section] = [
    Section("ceiling", ceiling_section, description="the machine's fp32 / bf16 matmul and conv GFLOP/s"),
    Section("load", load_section, description="fp32 single-file load in fresh subprocesses (CPU)"),
    Section("sdxl", sdxl_section, description="SDXL base UNet step (frees the SD1.5 models first)"),
    Section("unet", unet_section),
    Section("text", text_section),
    Section("decode", decode_section),
    Section("pipeline", pipeline_section),
    Section("lora", lora_section),
    Section("regional", regional_section, description="a LoRA on half the image (blend / keep), ours only"),
    Section("controlnet", controlnet_section),
    Section("ip_adapter", ip_adapter_section),
    Section("scaling", scaling_section),
    Section("profile", profile_section),
    Section("channels_last", channels_last_section, description="opt-in NHWC weights (eager)"),
    Section("compiled", compiled_section, description="opt-in torch.compile path (inductor)"),
    Section("bf16", bf16_section, description="bf16 UNet / text encoder: ours, diffusers, ComfyUI; vs fp32"),
    Section("accelerations", accelerations_section, description="DeepCache and ToMe, 20-step 512² txt2img"),
]
"""Run in this order (SDXL first: it needs the memory the SD1.5 models would hold). Add a section here."""


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


def ratio(row: Row, values: dict[str, float], other: str) -> str:
    if OURS in values and other in values and values[other] > 0:
        return f"{values[OURS] / values[other]:.3f}"
    return "—"


def achieved(row: Row, ceiling: dict[str, float]) -> str:
    """Ours' achieved GFLOP/s, and its share of the ceiling of the row's dtype (the faster kernel of the two)."""
    if row.flops is None or not row.medians.get(OURS):
        return "—"
    rate = row.flops / row.medians[OURS] / 1e9
    limit = ceiling.get(row.dtype)
    return f"{rate:.0f}" + (f" ({100 * rate / limit:.0f} %)" if limit else "")


def table(rows: list[Row], columns: list[str], ceiling: dict[str, float] | None = None) -> list[str]:
    others = [other for other in (DIFFUSERS, COMFYUI, REFINERS) if other in columns]
    header = ["section", "what", *columns, *(f"ours/{other}" for other in others)]
    header += ["ours/diffusers (CPU time)", "GFLOP", "ours GFLOP/s (% of ceiling)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [row.section, row.what, *(format_value(row.medians.get(c), row.unit) for c in columns)]
        for other in others:
            cells.append(ratio(row, row.medians, other))
        cells.append(ratio(row, row.cpu, DIFFUSERS))
        cells.append("—" if row.flops is None else f"{row.flops / 1e9:,.0f}")
        cells.append(achieved(row, ceiling or {}))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


TARGETS = (  # (what, the rows' sections that measure it, the issue's target for ours/diffusers)
    ("UNet step (SD1.5, 32²)", ("UNet", "opt-in NHWC", "compiled"), "step"),
    ("text encode (CLIP-L)", ("CLIP-L",), "text encode"),
    ("VAE decode", ("VAE", "opt-in NHWC"), "decode"),
    ("single-file load", ("load",), ": time"),
)


PATHS = {
    "load": "default",
    "compiled": "**compiled** (opt-in torch.compile, inductor)",
    "opt-in NHWC": "opt-in channels-last weights (eager)",
}


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets (ours/diffusers ≤ 0.9): every path measured for each, by wall and CPU time."""
    lines = [
        "## Targets: ours/diffusers ≤ 0.9",
        "",
        "| what | path | ours/diffusers (wall) | ours/diffusers (CPU time) | ≤ 0.9 |",
        "|---|---|---|---|---|",
    ]
    for what, sections, key in TARGETS:
        for row in rows:
            if row.section not in sections or key not in row.what.lower() or DIFFUSERS not in row.medians:
                continue
            path = PATHS.get(row.section, "default (eager, NCHW)")
            wall = row.medians[OURS] / row.medians[DIFFUSERS]
            cpu = row.cpu[OURS] / row.cpu[DIFFUSERS] if row.cpu.get(DIFFUSERS) else None
            best = min(value for value in (wall, cpu) if value is not None)
            reached = (
                "yes"
                if max(value for value in (wall, cpu) if value is not None) <= 0.9
                else ("by one clock" if best <= 0.9 else "no")
            )
            cpu_text = f"{cpu:.3f}" if cpu is not None else "—"
            lines.append(f"| {what} | {path} | {wall:.3f} | {cpu_text} | {reached} |")
    return [*lines, ""]


FINDINGS = [
    "## Reading the figures",
    "",
    "- Eager, default layout: the UNet step, text encode and VAE decode run at ~1.0× diffusers because both "
    "spend > 90 % of the step in the same kernels, called the same number of times (see the profile: oneDNN "
    "convolutions, MKL GEMMs, the flash-attention CPU kernel); the framework's own overhead (Chain calls, "
    "contexts) is below the noise. Going below 0.9× in eager mode needs other kernels or layouts, not less "
    "Python.",
    "- Channels-last (opt-in, `fluxion.compile.channels_last`): with NCHW weights oneDNN reorders each "
    "convolution weight into its blocked layout on every call (seen as one minor page fault per weight page "
    "per call: ~465k per 16² UNet step, as many as the UNet's conv weights have pages). NHWC weights and "
    "activations avoid that for some convolutions (320 channels at 32²: no faults, ~25 % faster) but not for "
    "others (1280 channels at 8²: the same faults), and spatial attention then reads its tokens without a "
    "copy. Net effect: see the opt-in NHWC rows (the VAE decode gains, the UNet step about breaks even on an "
    "idle machine; under heavy load from other processes it measured 0.85× diffusers). It copies the conv "
    "weights (no sharing with a memory-mapped file), hence opt-in.",
    "- Compiled (opt-in, `foundationals.latent_diffusion.unet.compile_unet`): regional `torch.compile` "
    "of the ResNet blocks and spatial transformers (inductor, C++ on CPU, static shapes). Its row is "
    "labelled compiled and compares with diffusers in eager mode. Measured while choosing the defaults (same "
    "32² step): inductor's layout optimisation on 1.28× diffusers (it converts convolutions to channels-last "
    "around every call), off 1.00×; `freezing` (prepacked weights) ~10× slower with regional graphs and it "
    "bakes the weights in (LoRA fuse would not be seen), so it is not used. Adapters injected or ejected "
    "later make the touched blocks recompile (tests/fluxion/test_compile.py: compiled == eager through "
    "inject / eject / in-place weight changes).",
    "- Fused LoRA: the earlier 1.11× (1 LoRA) and 1.27× (3 LoRAs) fused figures were a measurement "
    "artefact, not a cost of fused weights: they were 2 back-to-back samples per implementation, without "
    "warm-up and not interleaved, on a machine whose load changes by the minute. The fused weights have "
    "the dtype, strides and contiguity of the base weights (checked in the run, see the notes), the fused "
    "step runs the same ops and takes the same page faults as the LoRA-free step (measured with "
    "getrusage). Now ours fused, diffusers on the same fused tensors and a LoRA-free twin of our UNet run "
    "in one interleaved loop: see the 'ours / our LoRA-free UNet in the same loop' notes.",
    "",
]


def report(rows: list[Row], info: dict[str, str], bench: Bench, quick: bool, command: str) -> str:
    sizes = bench.sizes
    columns = [OURS, DIFFUSERS]
    if any(COMFYUI in row.medians for row in rows):
        columns.append(COMFYUI)
    if any(REFINERS in row.medians for row in rows):
        columns.append(REFINERS)
    if any("raw" in row.medians for row in rows):
        columns.append("raw")
    device = f"{bench.device.type}, {str(bench.dtype).removeprefix('torch.')} (VAE fp32)"
    lines = [
        "# Benchmarks: SD1.5 and SDXL, ours side by side with diffusers, ComfyUI and refiners",
        "",
        f"Generated by `{command}`: do not edit by hand. Full-size SD1.5 (UNet, autoencoder, CLIP-L) and the "
        "SDXL base UNet with random weights; the implementations share the same weight tensors and run in "
        "one process, interleaved (each repeat runs every implementation, rotating the order); figures are "
        "medians of wall time, and the last column is the ratio of the medians of this process' CPU time "
        "(less disturbed by other processes on a shared machine). Lower is better; a ratio < 1 means ours "
        "is faster / smaller.",
        "",
        f"- machine: {info['cpu']}, torch threads = {info['threads']}, python {info['python']}; device {device}",
        f"- versions: torch {info['torch']}, diffusers {info['diffusers']}, transformers "
        f"{info['transformers']}, refiners {REFINERS_VERSION}, ours {info['ours']}",
        f"- date: {info['date']}",
        f"- sizes: UNet step batch 2 (CFG) on a {sizes.unet_latent}×{sizes.unet_latent} latent; text encode "
        f"batch 2 × 77 tokens; VAE decode of a {sizes.vae_latent}×{sizes.vae_latent} latent to "
        f"{sizes.vae_latent * 8}² pixels; txt2img {sizes.pipeline_steps} DDIM steps at "
        f"{sizes.pipeline_image}² with CFG 7.5; LoRA: rank 16 on every attention projection (to_q/k/v/out) "
        f"on a {sizes.lora_latent}² UNet step; SDXL UNet step batch 2 on a {sizes.sdxl_latent}² latent; "
        f"repeats {sizes.repeats} (pipeline {sizes.pipeline_repeats}; LoRA, ControlNet, IP-Adapter, SDXL "
        f"{max(1, sizes.repeats - 1)}), after one warm-up run each.",
        "- noise: 2 cores that other work may share: absolute seconds vary between samples; read the "
        "ratios of the same loop, and expect a few percent of spread in them. Load average (1 / 5 / 15 min): "
        + ("; ".join(bench.load_averages) or "not recorded")
        + ".",
        "- ComfyUI: its own `comfy` package (the checkout named by FLUXION_BENCH_COMFYUI, in its own venv and "
        "torch, a worker subprocess: `bench/comfyui_worker.py`) loads our weights written as an original-layout "
        "single file and runs its UNet (`diffusion_model`), CLIP-L (`text_model`) and VAE (`first_stage_model."
        "decode`) on the same inputs, interleaved with ours and diffusers; it times itself (wall and its own CPU "
        "time). Without the variable the ComfyUI column stays empty.",
        "- GPU: `--device cuda --dtype fp16` runs every section on a CUDA device (fp16 UNet and text "
        "encoder, fp32 VAE; loading stays a CPU measurement). No GPU was available for this run, so no "
        "CUDA figures are reported here; that path has not been run yet.",
        "",
        *table(rows, columns, bench.ceiling),
        "",
    ]
    lines += targets(rows)
    for title, block in bench.extra.items():
        lines += [f"## {title}", "", *block, ""]
    lines += FINDINGS
    parity_notes = [f"{row.section} / {row.what}: {row.note}" for row in rows if row.note]
    if parity_notes or bench.notes:
        lines += ["## Notes", ""]
        lines += [f"- {note}" for note in [*parity_notes, *bench.notes]]
        lines.append("")
    lines += ["## Samples (wall seconds, in run order)", ""]
    for row in rows:
        if row.samples:
            parts = "; ".join(
                f"{name}: {', '.join(f'{value:.3f}' for value in values)}"
                for name, values in row.samples.items()
            )
            lines.append(f"- {row.section} / {row.what}: {parts}")
    return "\n".join(lines) + "\n"


KEPT = (("<!-- guidance-bench:begin -->", "<!-- guidance-bench:end -->"),)
"""Sections other scripts write into the same file (bench/guidance.py): kept when this one rewrites it."""


def kept_sections(path: Path) -> str:
    current = path.read_text(encoding="utf-8") if path.exists() else ""
    kept = []
    for begin, end in KEPT:
        if begin in current and end in current:
            kept.append(begin + current.split(begin, 1)[1].split(end, 1)[0] + end + "\n")
    return "".join("\n" + block for block in kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "BENCHMARKS.md")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "fluxion-bench")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--no-refiners", action="store_true", help="skip refiners 0.4.0")
    parser.add_argument("--no-load", action="store_true", help="skip the single-file loading section")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="UNet / text encoder dtype")
    parser.add_argument(
        "--sections",
        default=",".join(section.name for section in SECTIONS if section.default),
        help=f"comma-separated, from: {', '.join(section.name for section in SECTIONS)}",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = set(args.sections.split(","))
    unknown = chosen - {section.name for section in SECTIONS}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if args.no_load:
        chosen.discard("load")
    args.folder.mkdir(parents=True, exist_ok=True)
    bench = Bench(
        sizes=QUICK if args.quick else FULL,
        folder=args.folder,
        device=torch.device(args.device),
        dtype=DTYPES[args.dtype],
        use_refiners=not args.no_refiners,
    )
    hidden = {"--output", "--folder"}  # and their values
    shown = [
        arg for index, arg in enumerate(sys.argv[1:]) if arg not in hidden and sys.argv[index] not in hidden
    ]
    command = " ".join(["python bench/run.py", *shown])
    started = time.perf_counter()
    rows: list[Row] = []
    bench.note_load("start")
    try:
        run_sections(bench, chosen, rows, started, args.output, args.quick, command)
    finally:
        bench.close_comfy()
    bench.note_load("end")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bench.notes.append(
        f"this process' peak RSS {peak:,.0f} MiB; total run {time.perf_counter() - started:.0f} s"
    )
    text = report(rows, machine(), bench, args.quick, command) + kept_sections(args.output)
    args.output.write_text(text, encoding="utf-8")
    print("\n" + text)


COMFY_SECTIONS = ("unet", "text", "decode", "bf16")
"""The sections that run ComfyUI's worker: it is stopped (its memory freed) once none of them is left."""


def run_sections(
    bench: Bench, chosen: set[str], rows: list[Row], started: float, output: Path, quick: bool, command: str
) -> None:
    for index, section in enumerate(SECTIONS):
        if section.name not in chosen:
            continue
        try:
            new = section.run(bench)
        except Exception as error:  # one broken section must not lose the others' figures
            bench.notes.append(f"section {section.name} failed: {type(error).__name__}: {error}")
            print(f"section {section.name} failed: {error!r}", flush=True)
            gc.collect()
            continue
        gc.collect()  # the section's own models go now (fluxion Chains hold reference cycles)
        rows.extend(new)
        for row in new:
            figures = ", ".join(
                f"{name} {format_value(value, row.unit)}" for name, value in row.medians.items()
            )
            print(
                f"[{time.perf_counter() - started:5.0f} s] {row.section} / {row.what}: {figures}", flush=True
            )
        print(f"[{time.perf_counter() - started:5.0f} s] section {section.name} done", flush=True)
        bench.note_load(f"after {section.name}")
        if not any(later.name in chosen and later.name in COMFY_SECTIONS for later in SECTIONS[index + 1 :]):
            bench.close_comfy()
        partial = report(rows, machine(), bench, quick, command + f"  (partial: up to {section.name})")
        partial += kept_sections(output)
        output.write_text(partial, encoding="utf-8")  # a run cut short still leaves its figures


if __name__ == "__main__":
    main()
