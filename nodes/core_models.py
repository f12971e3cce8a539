"""A Fluxion model wire run as ComfyUI's diffusion model: the host-free part (no ComfyUI import).

ComfyUI's samplers call `BaseModel.diffusion_model(x, timesteps, context, y=None, control=None,
transformer_options={})` once per model evaluation, with the batch made of chunks (one per entry of
`transformer_options["cond_or_uncond"]`: 0 = positive, 1 = negative) in whatever order and number
`calc_cond_batch` chose. Our adapters expect our own layout: `[negative, positive]` (each `batch_size`
items) when the run uses guidance, the positive alone otherwise. `FluxionDiffusionModel` maps one onto the
other: it groups the chunks into (negative, positive) pairs, duplicating a chunk into a missing half
(the duplicate's output is thrown away), runs our UNet once per pair and puts every chunk's output back in
ComfyUI's order.

The adapter stack of the wire is applied for a whole sampling run (`FluxionDiffusionModel.sampling`, used
by the OUTER_SAMPLE wrapper of `comfy_models`) and undone after it, also on errors and cancellation. The
run's step index comes from the schedule (`transformer_options["sample_sigmas"]`) and the current sigma.

What core nodes add through `control` (core ControlNet residuals) goes onto `UNet.set_control_residuals`:
`control["output"]` is popped from the end by core's UNet, one entry per skip connection from the last
one, `control["middle"]` is added after the middle block. `control["input"]` (added to the input blocks'
running features, as core's T2I-Adapters do) has no counterpart in our UNet and is refused.

SDXL: core's `y` is `cat(pooled, sinusoidal(256) of the 6 size/crop values)`, exactly what our
`TextTimeEmbedding` concatenates from the pooled text and the time ids. For the run, `AdditionEmbeddingInput`
replaces that concatenation by a read of `y` (context "sdxl" key "addition_embedding"), so our UNet sees
core's vector bit for bit; the pooled part of `y` is also written as "pooled_text_embedding".
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..fluxion import layers as fl
from ..fluxion.casting import compute_placement
from ..foundationals.latent_diffusion.model_patch import ModelPatch, SamplingRun, Undo, patched
from ..foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from ..foundationals.latent_diffusion.unet import TextTimeEmbedding, UNet

COND, UNCOND = 0, 1
"""ComfyUI's codes in `cond_or_uncond` (comfy.samplers.COND / UNCOND)."""


# -- step index -------------------------------------------------------------------------------------------------


def step_index(sample_sigmas: Tensor | None, sigma: Tensor | float | None, num_steps: int) -> int:
    """The step of the schedule `sample_sigmas` (decreasing, num_steps + 1 values) that `sigma` belongs to.

    Step i covers sigmas in (sigmas[i + 1], sigmas[i]]: a solver's intermediate evaluations inside one
    interval count as that step, an evaluation at sigmas[i + 1] as the next one. Without a schedule: 0.
    """
    if sample_sigmas is None or sigma is None or num_steps <= 1:
        return 0
    value = float(torch.as_tensor(sigma).detach().float().max().cpu())
    schedule = torch.as_tensor(sample_sigmas).detach().float().cpu().reshape(-1)
    tolerance = 1e-4 * max(abs(value), 1e-6)
    later = int((schedule[1:] >= value - tolerance).sum())
    return min(max(later, 0), num_steps - 1)


# -- batch layout -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How ComfyUI's chunks become UNet calls in our layout.

    `calls[k]` lists the chunk indices concatenated for call k (guided: `(negative, positive)`);
    `sources[i]` is `(call, slot)` whose output is chunk i's.
    """

    calls: tuple[tuple[int, ...], ...]
    sources: tuple[tuple[int, int], ...]


def plan_batch(cond_or_uncond: Sequence[int], guided: bool) -> BatchPlan:
    """Group chunks into our layout: guided runs pair a negative with a positive (duplicating a missing
    half); unguided runs call the UNet on each chunk alone (patches expect `batch_size` items)."""
    count = len(cond_or_uncond)
    if not guided:
        return BatchPlan(tuple((i,) for i in range(count)), tuple((i, 0) for i in range(count)))
    negatives = [i for i, code in enumerate(cond_or_uncond) if code == UNCOND]
    positives = [i for i, code in enumerate(cond_or_uncond) if code != UNCOND]
    calls: list[tuple[int, int]] = []
    sources: dict[int, tuple[int, int]] = {}
    for k in range(max(len(negatives), len(positives))):
        negative = negatives[k] if k < len(negatives) else None
        positive = positives[k] if k < len(positives) else None
        if negative is not None:
            sources[negative] = (k, 0)
        if positive is not None:
            sources[positive] = (k, 1)
        calls.append(
            (negative if negative is not None else positive, positive if positive is not None else negative)
        )  # type: ignore[arg-type]
    return BatchPlan(tuple(calls), tuple(sources[i] for i in range(count)))


def _chunk(value: Any, index: int, size: int, total: int) -> Any:
    """Chunk `index` of a batched tensor (batch `total` = chunks * size); anything else is kept."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[index * size : (index + 1) * size]
    return value


def _gather(value: Any, indices: Sequence[int], size: int, total: int) -> Any:
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == total:
        return torch.cat([_chunk(value, i, size, total) for i in indices])
    return value


# -- core control -----------------------------------------------------------------------------------------------


def control_residuals(
    control: Mapping[str, Sequence[Tensor | None]] | None,
    skip_count: int,
    select: Any = None,
) -> list[Tensor | float]:
    """Core's `control` dict as our `set_control_residuals` list (skips in input-block order, then middle).

    Core's UNet pops `control["output"]` once per output block, i.e. from the last skip connection back:
    entry -1 goes to the last skip, -2 to the one before, and so on. `select(tensor)` picks the batch items
    of the current call (see `FluxionDiffusionModel`).
    """
    residuals: list[Tensor | float] = [0.0] * (skip_count + 1)
    if not control:
        return residuals
    if any(item is not None for item in control.get("input", []) or []):
        raise ValueError(
            "core control with 'input' residuals (core T2I-Adapters) cannot act on a Fluxion model: "
            "use Fluxion Apply T2I-Adapter on the Fluxion model before Fluxion To Core Model"
        )
    outputs = list(control.get("output", []) or [])
    if len(outputs) > skip_count:
        raise ValueError(
            f"core control has {len(outputs)} output residuals, the Fluxion UNet has {skip_count} skip "
            "connections: the ControlNet is for another model family"
        )
    pick = select or (lambda tensor: tensor)
    for offset, residual in enumerate(reversed(outputs)):
        if residual is not None:
            residuals[skip_count - 1 - offset] = pick(residual)
    middle = list(control.get("middle", []) or [])
    if middle and middle[-1] is not None:
        residuals[-1] = pick(middle[-1])
    return residuals


# -- SDXL: core's y as our addition embedding -------------------------------------------------------------------


class AdditionEmbeddingInput:
    """Patch: SDXL's TextTimeEmbedding reads core's precomputed `y` instead of concatenating its parts."""

    label = "core y as SDXL addition embedding"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        embedding = model.unet.ensure_find(TextTimeEmbedding)
        concatenation = next(child for child in embedding if isinstance(child, fl.Concatenate))
        reader = fl.UseContext("sdxl", "addition_embedding")
        embedding.replace(concatenation, reader)

        def undo() -> None:
            embedding.replace(reader, concatenation)

        return undo


# -- the diffusion model ---------------------------------------------------------------------------------------


class FluxionDiffusionModel(torch.nn.Module):
    """ComfyUI's `diffusion_model` interface over a Fluxion model wire (its UNet and adapter stack)."""

    def __init__(self, model: StableDiffusion, patches: Sequence[ModelPatch], name: str = "") -> None:
        super().__init__()
        self.unet: UNet = model.unet
        self._model = [model]  # not a submodule: only the UNet's weights belong to this module
        self.patches = tuple(patches)
        self.name = name
        self._run: SamplingRun | None = None
        self._sigmas: Tensor | None = None

    @property
    def model(self) -> StableDiffusion:
        return self._model[0]

    @property
    def is_sdxl(self) -> bool:
        return self.unet.config.addition_embedding == "text_time"

    @property
    def dtype(self) -> torch.dtype:
        return compute_placement(self.unet)[1]

    def run_patches(self) -> tuple[ModelPatch, ...]:
        return ((AdditionEmbeddingInput(),) if self.is_sdxl else ()) + self.patches

    @contextmanager
    def sampling(self, run: SamplingRun, sigmas: Tensor | None = None) -> Iterator[SamplingRun]:
        """Apply the stack for `run` (schedule `sigmas`), yield, undo it whatever happens."""
        if self._run is not None:
            raise RuntimeError(f"{self.name or 'this Fluxion model'} is already sampling (nested runs)")
        with patched(self.model, self.run_patches(), run):
            self._run, self._sigmas = run, sigmas
            try:
                yield run
            finally:
                self._run, self._sigmas = None, None
                self.unet.set_control_residuals(None)

    def forward(
        self,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None = None,
        y: Tensor | None = None,
        control: Mapping[str, Any] | None = None,
        transformer_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        options = transformer_options or {}
        codes = list(options.get("cond_or_uncond") or [COND])
        if x.shape[0] % len(codes) != 0:
            codes = [COND]
        if self._run is not None:
            return self._forward(self._run, x, timesteps, context, y, control, options, codes)
        # called outside a sampling run (another pack's direct call): the stack is applied for this call
        sigmas = options.get("sample_sigmas")
        steps = max(1, len(sigmas) - 1) if sigmas is not None else 1
        guided = any(code == UNCOND for code in codes)
        run = SamplingRun(steps, 0, x.shape[-2], x.shape[-1], x.shape[0] // len(codes), guided)
        with self.sampling(run, sigmas):
            return self._forward(run, x, timesteps, context, y, control, options, codes)

    def _forward(
        self,
        run: SamplingRun,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor | None,
        y: Tensor | None,
        control: Mapping[str, Any] | None,
        options: Mapping[str, Any],
        codes: list[int],
    ) -> Tensor:
        if context is None:
            raise ValueError(f"{self.name or 'Fluxion model'}: core sampling gave no text conditioning")
        if self.is_sdxl and y is None:
            raise ValueError(
                f"{self.name or 'Fluxion model'} is SDXL: core sampling gave no 'y' (pooled + sizes)"
            )
        sigmas = options.get("sample_sigmas", self._sigmas)
        run.run_step_hooks(step_index(sigmas, options.get("sigmas"), run.num_steps))
        total, count = x.shape[0], len(codes)
        size = total // count
        plan = plan_batch(codes, run.uses_guidance)
        if run.uses_guidance and size != run.batch_size:
            raise ValueError(
                f"core sampling gave chunks of {size} latents, the run was prepared for {run.batch_size}"
            )
        outputs: list[Tensor] = []
        for indices in plan.calls:

            def select(tensor: Tensor, indices: tuple[int, ...] = indices) -> Tensor:
                return _gather(tensor, indices, size, total)

            outputs.append(
                self._call_unet(
                    run,
                    select(x),
                    select(timesteps),
                    select(context),
                    None if y is None else select(y),
                    control_residuals(control, self.unet.skip_connection_count, select),  # type: ignore[arg-type]
                )
            )
        if plan.calls == (tuple(range(count)),):
            return outputs[0]
        return torch.cat(
            [_chunk(outputs[call], slot, size, size * len(plan.calls[call])) for call, slot in plan.sources]
        )

    def _call_unet(
        self,
        run: SamplingRun,
        x: Tensor,
        timesteps: Tensor,
        context: Tensor,
        y: Tensor | None,
        residuals: list[Tensor | float],
    ) -> Tensor:
        unet = self.unet
        device, dtype = compute_placement(unet)
        unet.set_timestep(timesteps.to(device=device).reshape(-1).float())
        unet.set_clip_text_embedding(context.to(device=device, dtype=dtype))
        if y is not None and self.is_sdxl:
            sdxl = unet.use_context("sdxl")
            sdxl["addition_embedding"] = y.to(device=device, dtype=dtype)
            sdxl["pooled_text_embedding"] = y[:, : unet.config.pooled_text_dim].to(device=device, dtype=dtype)
        unet.set_control_residuals(
            [r.to(device=device, dtype=dtype) if isinstance(r, Tensor) else r for r in residuals]
        )
        try:
            prediction = run.predict(unet, x.to(device=device, dtype=dtype))
        finally:
            unet.set_control_residuals(None)
        return prediction.to(x.dtype)


def sampling_run(noise_shape: Sequence[int], num_steps: int, uses_guidance: bool) -> SamplingRun:
    """The `SamplingRun` of a core sampling call on latents of `noise_shape` (B, C, h, w) over `num_steps`."""
    return SamplingRun(
        num_steps=max(1, num_steps),
        first_step=0,
        latent_height=int(noise_shape[-2]),
        latent_width=int(noise_shape[-1]),
        batch_size=int(noise_shape[0]),
        uses_guidance=uses_guidance,
    )
