"""Adapter stacks applied for one sampling run: patch, sample, undo.

A model shared by several users (ComfyUI branches, cached loaders) is never adapted for good: each
sampling run applies an ordered stack of `ModelPatch`es (LoRA, ControlNet, T2I-Adapter, IP-Adapter,
reference-only, context values), samples, and undoes them in reverse order, also on errors and
cancellation. Patches that act only on some steps (start/end windows) register a step hook; patches
restricted to a mask register a `Region` (see `regional`): the run's `predict` then blends one UNet pass
per active region into the base prediction. Guidance patches (PAG, SAG, rescaled CFG, CFG cutoff) add a
`GuidanceHook` to `guidance`; patches whose inputs are per batch item follow the batch layout of each pass
through `on_halves` (see `guidance.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from torch import Tensor, nn

from ...fluxion import layers as fl
from .adapters.regional import Region, blend_region_predictions
from .guidance import GuidanceHook, GuidanceStack, Halves, halves_for

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion
    from .tiling import TileLayout

Undo = Callable[[], None]
StepHook = Callable[[int], None]


@dataclass
class SamplingRun:
    """What patches may need to know about the run they are applied for."""

    num_steps: int
    first_step: int
    latent_height: int
    latent_width: int
    batch_size: int
    uses_guidance: bool
    """With classifier-free guidance the UNet sees `[negative, positive]` as one batch of 2 * batch_size."""
    step_hooks: list[StepHook] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    """Masked adapters: each active one costs one more UNet pass per step (see `regional`)."""
    current_step: int | None = None
    guidance: list[GuidanceHook] = field(default_factory=list)
    """Guidance hooks of the run's patches, in stack order (see `guidance.GuidanceStack`)."""
    halves_listeners: list[Callable[[Halves], None]] = field(default_factory=list)
    halves: Halves | None = None
    """The batch layout of the UNet pass about to run (None: the main layout, `stored_halves`)."""

    @property
    def stored_halves(self) -> Halves:
        """The layout patches prepare their per-item inputs for: `[negative, positive]` with guidance."""
        return halves_for(self.uses_guidance)

    def on_halves(self, listener: Callable[[Halves], None]) -> None:
        """Call `listener(halves)` whenever the batch layout of the next UNet pass changes."""
        self.halves_listeners.append(listener)

    def set_halves(self, halves: Halves) -> None:
        """Announce the batch layout of the next UNet passes (a guidance pass on one half, CFG cut off)."""
        if halves == (self.halves or self.stored_halves):
            return
        self.halves = None if halves == self.stored_halves else halves
        for listener in self.halves_listeners:
            listener(halves)

    def guidance_stack(self) -> GuidanceStack | None:
        """The run's guidance hooks for `denoise`, or None when no patch added any (plain CFG)."""
        if not self.guidance:
            return None
        return GuidanceStack(self.guidance, self.set_halves, self.stored_halves)

    prediction_hooks: list[Callable[[Tensor, Tensor], None]] = field(default_factory=list)
    """Called with (model input, prediction) after each prediction of the run (e.g. step previews)."""
    window_listeners: list[Callable[[tuple[int, int, int, int] | None], None]] = field(default_factory=list)
    window: tuple[int, int, int, int] | None = None
    """The tile the next UNet passes run on, (height, width, top, left) in latent cells of the whole
    `latent_height` x `latent_width` latent (tiled sampling, see `tiling.py`); None: the whole latent."""
    tiling: TileLayout | None = None
    """MultiDiffusion for this run (set by a `TiledDiffusionPatch`, see `tiling.py`); None: the plain path."""

    def on_window(self, listener: Callable[[tuple[int, int, int, int] | None], None]) -> None:
        """Call `listener(window)` whenever the tile the UNet runs on changes (adapters crop their hints)."""
        self.window_listeners.append(listener)

    def set_window(self, window: tuple[int, int, int, int] | None) -> None:
        """Announce the tile of the next UNet passes (None: the whole latent again)."""
        if window == self.window:
            return
        self.window = window
        for listener in self.window_listeners:
            listener(window)

    def progress(self, step: int) -> float:
        """Fraction of the whole schedule done before `step` (0 at the first step of txt2img)."""
        return step / self.num_steps

    def on_step(self, hook: StepHook) -> None:
        """Call `hook(step)` before each UNet call of the run."""
        self.step_hooks.append(hook)

    def run_step_hooks(self, step: int) -> None:
        self.current_step = step
        for hook in self.step_hooks:
            hook(step)

    @property
    def keeps_outside(self) -> bool:
        """Whether a region asks for the latents outside the regions to stay as without them."""
        return any(region.keep_outside for region in self.regions)

    @contextmanager
    def without_regions(self) -> Iterator[None]:
        """Within the block the run has no regions (every regional adapter stays off)."""
        regions, self.regions = self.regions, []
        try:
            yield
        finally:
            self.regions = regions

    def predict(self, unet: fl.Chain, x: Tensor) -> Tensor:
        """The UNet's prediction for `x` at the current step, with this run's regions blended in."""
        if not self.regions:
            prediction = unet(x)
        else:
            step = self.first_step if self.current_step is None else self.current_step
            prediction = blend_region_predictions(unet, x, self.regions, self.progress(step))
        for hook in self.prediction_hooks:
            hook(x, prediction)
        return prediction


class ModelPatch(Protocol):
    """One entry of a model's adapter stack.

    A patch that runs models of its own besides the UNet (a ControlNet, a T2I-Adapter, IP-Adapter weights)
    also has `models() -> Sequence[torch.nn.Module]`: they are brought to the run's device with the UNet
    before the patch is applied (see `patch_models`).
    """

    @property
    def label(self) -> str:
        """A short description for the model inspector, e.g. "LoRA style.safetensors (unet 0.8, clip 1.0)"."""
        ...

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Adapt `model` for this run and return the function that restores it exactly.

        `run` is None when the patch is applied for text encoding only (a LoRA's text-encoder part).
        """
        ...


def patch_models(patches: Sequence[object]) -> list[nn.Module]:
    """The models `patches` run besides the UNet (each once, in stack order), from their `models()`."""
    found: list[nn.Module] = []
    for patch in patches:
        models = getattr(patch, "models", None)
        for model in models() if callable(models) else ():
            if all(model is not other for other in found):
                found.append(model)
    return found


@contextmanager
def patched(model: StableDiffusion, patches: Sequence[ModelPatch], run: SamplingRun | None) -> Iterator[None]:
    """Apply `patches` in order, yield, then undo them in reverse order whatever happens.

    If a patch fails to apply, the ones already applied are undone before the error propagates, so a
    failed call leaves the model as it was.
    """
    undos: list[Undo] = []
    try:
        for patch in patches:
            undos.append(patch.apply(model, run))
        yield
    finally:
        errors: list[BaseException] = []
        for undo in reversed(undos):
            try:
                undo()
            except BaseException as error:  # keep restoring the others, then report
                errors.append(error)
        if errors:
            raise errors[0]
