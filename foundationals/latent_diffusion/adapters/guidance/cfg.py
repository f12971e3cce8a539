"""Changes to classifier-free guidance itself: rescaled CFG and CFG cutoff. Neither adds a UNet pass.

Rescaled CFG (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed"): the guided
prediction is rescaled to the standard deviation of the conditional one, and mixed back:
`multiplier * cfg * std(conditional) / std(cfg) + (1 - multiplier) * cfg` (std over each item's elements).
- `space="model_output"`: on the UNet's output (epsilon or v), after the other guidance terms (PAG, SAG), as
  diffusers' `guidance_rescale` (`rescale_noise_cfg`);
- `space="v"`: ComfyUI's RescaleCFG: the predictions are turned into v, `(x / (sigma^2 + 1) - x0) *
  sqrt(sigma^2 + 1) / sigma` (x: the k-diffusion input, `sqrt(sigma^2 + 1)` times the variance-preserving
  one; x0: the clean latents each prediction implies), rescaled there, and turned back; it replaces the
  CFG combination, so PAG and SAG terms are added after it, as ComfyUI orders them.
Steps without CFG are left alone.

CFG cutoff: the negative (unconditional) half stops after a fraction of the steps, as diffusers'
`SDCFGCutoffCallback` / `SDXLCFGCutoffCallback`: steps `0 .. int(ratio * steps)` run with guidance, the
later ones run the positive half alone (half the UNet batch) and use its prediction unguided.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from ...guidance import COMBINE, RESCALE, GuidanceHook, GuidanceStep
from ...model_patch import SamplingRun, Undo

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

RESCALE_SPACES = ("model_output", "v")


def _item_std(x: Tensor) -> Tensor:
    return x.std(dim=list(range(1, x.dim())), keepdim=True)


def rescale_to(guided: Tensor, conditional: Tensor, multiplier: float) -> Tensor:
    """`multiplier x guided x std(conditional) / std(guided) + (1 - multiplier) x guided`, per batch item."""
    rescaled = guided * (_item_std(conditional) / _item_std(guided))
    return multiplier * rescaled + (1 - multiplier) * guided


class RescaleCFGHook(GuidanceHook):
    def __init__(self, multiplier: float, space: str) -> None:
        if space not in RESCALE_SPACES:
            raise ValueError(f"unknown rescale space {space!r}; choose one of {', '.join(RESCALE_SPACES)}")
        self.multiplier, self.space = multiplier, space
        self.phase = RESCALE if space == "model_output" else COMBINE

    def adjust(
        self, step: GuidanceStep, unconditional: Tensor | None, conditional: Tensor, prediction: Tensor
    ) -> Tensor:
        if unconditional is None or self.multiplier == 0:
            return prediction
        if self.space == "model_output":
            return rescale_to(prediction, conditional, self.multiplier)
        alpha = step.alpha_bar().to(prediction.dtype)
        sigma = ((1 - alpha) / alpha) ** 0.5
        x = step.latents().to(prediction.dtype) / alpha**0.5  # the k-diffusion input: x0 + sigma * noise

        def to_v(output: Tensor) -> Tensor:
            return (x / (sigma**2 + 1) - step.to_clean(output)) * (sigma**2 + 1) ** 0.5 / sigma

        final = rescale_to(to_v(prediction), to_v(conditional), self.multiplier)
        clean = x / (sigma**2 + 1) - final * sigma / (sigma**2 + 1) ** 0.5
        return step.from_clean(clean)


class RescaleCFGPatch:
    """A `ModelPatch`: rescaled classifier-free guidance (see the module doc)."""

    def __init__(self, multiplier: float = 0.7, space: str = "model_output") -> None:
        if space not in RESCALE_SPACES:
            raise ValueError(f"unknown rescale space {space!r}; choose one of {', '.join(RESCALE_SPACES)}")
        if not 0.0 <= multiplier <= 1.0:
            raise ValueError(f"the rescale multiplier must be within 0..1, got {multiplier}")
        self.multiplier, self.space = multiplier, space

    @property
    def label(self) -> str:
        return f"rescaled CFG ({self.multiplier:g}, {self.space})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        hook = RescaleCFGHook(self.multiplier, self.space)
        run.guidance.append(hook)
        return lambda: run.guidance.remove(hook) if hook in run.guidance else None


class CFGCutoffHook(GuidanceHook):
    def __init__(self, ratio: float) -> None:
        self.ratio = ratio

    def last_guided_step(self, total: int) -> int:
        return int(total * self.ratio)

    def uses_negative(self, step: GuidanceStep) -> bool:
        return step.index <= self.last_guided_step(step.total)


class CFGCutoffPatch:
    """A `ModelPatch`: guidance (and the negative half's UNet batch) stop after `ratio` of the steps."""

    def __init__(self, ratio: float = 0.4) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"the CFG cutoff ratio must be within 0..1, got {ratio}")
        self.ratio = ratio

    @property
    def label(self) -> str:
        return f"CFG cutoff (after {self.ratio:g} of the steps)"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        hook = CFGCutoffHook(self.ratio)
        run.guidance.append(hook)
        return lambda: run.guidance.remove(hook) if hook in run.guidance else None
