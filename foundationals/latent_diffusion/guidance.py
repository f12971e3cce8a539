"""Guidance hooks: how a step's UNet passes become the prediction the solver uses.

Plain classifier-free guidance (CFG) runs the UNet once on `[negative, positive]` and takes
`unconditional + scale * (conditional - unconditional)`. Patches of a model's stack may add guidance
hooks to their sampling run (perturbed-attention and self-attention guidance, rescaled CFG, CFG cutoff);
`denoise` then hands every model evaluation to a `GuidanceStack`, which

1. asks each hook whether this step runs the negative (unconditional) half at all (`uses_negative`: a CFG
   cutoff says no after its step, and the step runs the positive half alone, as diffusers' cutoff callback),
2. lets each hook prepare (`before`), runs the main pass (then `after_main_pass`) and combines CFG,
3. lets each hook adjust the prediction (`adjust`), in phase order: `COMBINE` (a rule replacing the CFG
   combination), `TERMS` (extra guidance terms, each may run one more UNet pass on one half of the batch:
   PAG, SAG), `RESCALE` (rescaling the final prediction, as diffusers' `guidance_rescale`). Within a phase,
   hooks run in the order of the model's stack.

Batch halves. A guided UNet call holds one batch per half, `[negative, positive]`; adapters with inputs
per batch item (IP-Adapter tokens, T2I-Adapter features, ControlNet hints) prepare them for the layout of
their run at apply time (`halves_for(run.uses_guidance)`). A pass on one half only (`(POSITIVE,)` or
`(NEGATIVE,)`) is announced first through the stack's `set_halves` (the run's `SamplingRun.set_halves`),
and such adapters pick their rows with `select_halves`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

NEGATIVE, POSITIVE = "negative", "positive"
Halves = tuple[str, ...]
"""Which conditioning each equal part of a UNet batch has, in order: `(NEGATIVE, POSITIVE)` with CFG."""

COMBINE, TERMS, RESCALE = 0, 1, 2
"""The phases of `GuidanceHook.adjust`, in the order they run."""


def halves_for(uses_guidance: bool) -> Halves:
    """The batch layout of a run's main UNet pass: both halves with guidance, else the positive one."""
    return (NEGATIVE, POSITIVE) if uses_guidance else (POSITIVE,)


def select_halves(tensor: Tensor, stored: Halves, wanted: Halves) -> Tensor:
    """The rows of `tensor` (laid out as `stored`) for a batch laid out as `wanted`."""
    if wanted == stored:
        return tensor
    if tensor.shape[0] % len(stored) != 0:
        raise ValueError(f"a batch of {tensor.shape[0]} cannot be split into the halves {stored}")
    parts = dict(zip(stored, tensor.chunk(len(stored))))
    missing = [half for half in wanted if half not in parts]
    if missing:
        raise ValueError(f"a pass on the {' and '.join(missing)} half, but the inputs hold only {stored}")
    chosen = [parts[half] for half in wanted]
    return chosen[0] if len(chosen) == 1 else torch.cat(chosen)


def alpha_bar_at(alphas_cumprod: Tensor, timestep: Tensor) -> Tensor:
    """The training schedule's cumulative alpha at `timestep` (0-d float32).

    An integer timestep reads the table as diffusers does; a fractional one (sigma-based schedules such as
    Karras) interpolates log sigma between the neighbours, the inverse of how solvers place such timesteps.
    """
    t = float(timestep.reshape(-1)[0])
    table = alphas_cumprod.float().cpu()
    if t == int(t):
        return table[int(t)]
    low = min(max(int(t), 0), len(table) - 2)
    log_sigmas = (((1 - table) / table) ** 0.5).log().double()
    weight = min(max(t - low, 0.0), 1.0)
    sigma = ((1 - weight) * log_sigmas[low] + weight * log_sigmas[low + 1]).exp()
    return (1 / (1 + sigma**2)).float()


class Passes(Protocol):
    """How a guidance step runs the UNet (adapters, regions and the step's timestep included)."""

    has_negative: bool
    """Whether the run has a negative conditioning (guidance scale above 1 and a negative prompt)."""

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(unconditional, conditional) predictions of `x` (B, C, h, w), run as one batch of 2B."""
        ...

    def one(self, x: Tensor, half: str) -> Tensor:
        """The prediction of `x` under one half's conditioning only (a batch of B)."""
        ...


@dataclass(frozen=True)
class GuidanceStep:
    """One model evaluation of a sampling run, as the guidance hooks see it."""

    index: int
    """0-based index of the step among the steps this run makes."""
    total: int
    """How many steps this run makes (img2img: fewer than the schedule has)."""
    timestep: Tensor
    model_input: Tensor
    """The UNet's input (B, C, h, w): the scaled latents, plus an inpainting model's extra channels."""
    guidance_scale: float
    alphas_cumprod: Tensor
    prediction_type: str
    """"epsilon" or "v_prediction": what the UNet's output means."""
    passes: Passes

    @property
    def guided(self) -> bool:
        """Whether the run uses classifier-free guidance at all."""
        return self.passes.has_negative

    def alpha_bar(self) -> Tensor:
        return alpha_bar_at(self.alphas_cumprod, self.timestep).to(self.model_input.device)

    def latents(self) -> Tensor:
        """The noisy latents part of the UNet input (variance-preserving scale), without extra channels."""
        return self.model_input[:, : self.latent_channels]

    @property
    def latent_channels(self) -> int:
        return 4 if self.model_input.shape[1] == 9 else self.model_input.shape[1]

    def to_clean(self, output: Tensor) -> Tensor:
        """The clean latents (x0) a UNet output implies for this step's input."""
        x, alpha = self.latents().to(output.dtype), self.alpha_bar().to(output.dtype)
        if self.prediction_type == "v_prediction":
            return alpha**0.5 * x - (1 - alpha) ** 0.5 * output
        return (x - (1 - alpha) ** 0.5 * output) / alpha**0.5

    def to_noise(self, output: Tensor) -> Tensor:
        """The noise (epsilon) a UNet output implies for this step's input."""
        if self.prediction_type != "v_prediction":
            return output
        x, alpha = self.latents().to(output.dtype), self.alpha_bar().to(output.dtype)
        return (1 - alpha) ** 0.5 * x + alpha**0.5 * output

    def from_clean(self, clean: Tensor) -> Tensor:
        """The UNet output (of this run's prediction type) that implies the clean latents `clean`."""
        x, alpha = self.latents().to(clean.dtype), self.alpha_bar().to(clean.dtype)
        if self.prediction_type == "v_prediction":
            return (alpha**0.5 * x - clean) / (1 - alpha) ** 0.5
        return (x - alpha**0.5 * clean) / (1 - alpha) ** 0.5


class GuidanceHook:
    """One guidance of a run; override what it changes (the defaults change nothing)."""

    phase: int = TERMS

    def uses_negative(self, step: GuidanceStep) -> bool:
        """Whether this step runs the negative half (all hooks must agree for it to run)."""
        return True

    def before(self, step: GuidanceStep) -> None:
        """Called before the step's main pass."""

    def after_main_pass(self, step: GuidanceStep) -> None:
        """Called after the step's main pass, before any hook adjusts (and runs passes of its own)."""

    def adjust(
        self, step: GuidanceStep, unconditional: Tensor | None, conditional: Tensor, prediction: Tensor
    ) -> Tensor:
        """The step's prediction after this guidance (`unconditional` is None when the step has no CFG)."""
        return prediction


def classifier_free_guidance(unconditional: Tensor, conditional: Tensor, scale: float) -> Tensor:
    """`unconditional + scale * (conditional - unconditional)`, the operations of the plain loop."""
    return unconditional + scale * (conditional - unconditional)


class GuidanceStack:
    """The hooks of one run, called in order around each model evaluation (see the module doc)."""

    def __init__(
        self,
        hooks: Sequence[GuidanceHook],
        set_halves: Callable[[Halves], None] | None = None,
        stored: Halves = (NEGATIVE, POSITIVE),
    ) -> None:
        self.hooks = sorted(hooks, key=lambda hook: hook.phase)  # stable: the stack order within a phase
        self._set_halves = set_halves
        self.stored = stored

    def set_halves(self, halves: Halves) -> None:
        if self._set_halves is not None:
            self._set_halves(halves)

    def predict(self, step: GuidanceStep) -> Tensor:
        """The guided prediction for `step.model_input`."""
        guided = step.passes.has_negative and all(hook.uses_negative(step) for hook in self.hooks)
        passes = _AnnouncedPasses(step.passes, self.set_halves)
        step = GuidanceStep(
            step.index,
            step.total,
            step.timestep,
            step.model_input,
            step.guidance_scale,
            step.alphas_cumprod,
            step.prediction_type,
            passes,
        )
        try:
            for hook in self.hooks:
                hook.before(step)
            unconditional: Tensor | None = None
            if guided:
                unconditional, conditional = passes.both(step.model_input)
                prediction = classifier_free_guidance(unconditional, conditional, step.guidance_scale)
            else:
                conditional = passes.one(step.model_input, POSITIVE)
                prediction = conditional
            for hook in self.hooks:
                hook.after_main_pass(step)
            for hook in self.hooks:
                prediction = hook.adjust(step, unconditional, conditional, prediction)
            return prediction
        finally:
            self.set_halves(self.stored)


class _AnnouncedPasses:
    """Passes that announce their batch layout to the run's adapters first."""

    def __init__(self, passes: Passes, set_halves: Callable[[Halves], None]) -> None:
        self._passes = passes
        self._set_halves = set_halves
        self.has_negative = passes.has_negative

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._set_halves((NEGATIVE, POSITIVE))
        return self._passes.both(x)

    def one(self, x: Tensor, half: str) -> Tensor:
        self._set_halves((half,))
        return self._passes.one(x, half)


class ConditionedPasses:
    """`Passes` for one conditioning per half: sets the UNet's conditioning for each pass (only on change)."""

    def __init__(
        self,
        run_unet: Callable[[Tensor], Tensor],
        set_conditioning: Callable[[str], None],
        has_negative: bool,
        output_dtype: torch.dtype,
        current: str,
    ) -> None:
        self._run_unet = run_unet
        self._set_conditioning = set_conditioning
        self.has_negative = has_negative
        self._output_dtype = output_dtype
        self._current = current

    def _use(self, which: str) -> None:
        if which == NEGATIVE and not self.has_negative:
            raise ValueError("a pass on the negative half, but this run has no negative conditioning")
        if which != self._current:
            self._set_conditioning(which)
            self._current = which

    def both(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._use("both")
        unconditional, conditional = self._run_unet(torch.cat([x, x])).to(self._output_dtype).chunk(2)
        return unconditional, conditional

    def one(self, x: Tensor, half: str) -> Tensor:
        self._use(half)
        return self._run_unet(x).to(self._output_dtype)
