"""DeepCache (Ma et al. 2023): reuse the UNet's deep features across steps, recompute only a shallow branch.

The high-level features of a UNet change little from one denoising step to the next. Every `interval` steps
the UNet runs in full and the input of a chosen output block is kept; in the steps between, only the shallow
branch runs: input blocks `0..depth` (their skips are fresh), then the kept features go straight into output
blocks `N-1-depth..N-1`, which concatenate those fresh skips. Input blocks past `depth`, the middle block and
the deeper output blocks do not run.

`depth` counts LDM input blocks after the first convolution (input block 0). The default, 1, is DeepCache's
default branch for SD1.5 (`cache_branch_id=0`): conv in and the first ResNet + transformer layer of the first
down block, the last two ResNet + transformer layers of the last up block.

The cache belongs to one sampling run (`DeepCachePatch.apply` makes a fresh one, its undo drops it): nothing
leaks between runs or branches. Within a step, passes are numbered in call order (a CFG batch is one pass;
guidance extra passes, area conditioning or a solver's second evaluation are further passes), and a shallow
pass reuses the features its numbered twin of the last full step kept, only when the UNet input has the same
shape, dtype and device; otherwise that pass runs in full.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ....fluxion import layers as fl
from ....fluxion.adapters.adapter import Adapter
from ..model_patch import SamplingRun, Undo
from ..unet import ControlResidual, DownBlocks, MiddleBlock, UNet, UpBlocks

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

FULL, SHALLOW = "full", "shallow"


@dataclass
class DeepCacheState:
    """One run's schedule and cache: which kind of pass runs now, and the features each pass index kept."""

    interval: int
    start: float
    end: float
    num_steps: int
    step: int | None = None
    window_start: int | None = None
    step_is_full: bool = True
    pass_index: int = 0
    mode: str = FULL
    cache: dict[int, tuple[tuple[Any, ...], Tensor]] = field(default_factory=dict)
    current: int = 0
    signature: tuple[Any, ...] = ()
    full_passes: int = 0
    shallow_passes: int = 0

    def begin_step(self, step: int) -> None:
        """Called before the UNet calls of `step` (again for the same step when a host calls per pass)."""
        if step == self.step:
            return
        self.step, self.pass_index = step, 0
        progress = step / max(1, self.num_steps)
        if not (self.start <= progress < self.end) or self.interval <= 1:
            self.step_is_full = True
            return
        if self.window_start is None:
            self.window_start = step
        self.step_is_full = (step - self.window_start) % self.interval == 0

    def begin_pass(self, x: Tensor) -> None:
        """Called with the UNet input at the start of each pass: decide whether this pass runs in full."""
        index = self.pass_index
        self.pass_index += 1
        self.current = index
        self.signature = (tuple(x.shape), x.dtype, x.device)
        kept = self.cache.get(index)
        shallow = not self.step_is_full and kept is not None and kept[0] == self.signature
        self.mode = SHALLOW if shallow else FULL
        if shallow:
            self.shallow_passes += 1
        else:
            self.full_passes += 1

    def keep(self, features: Tensor) -> None:
        self.cache[self.current] = (self.signature, features)

    def kept(self) -> Tensor:
        return self.cache[self.current][1]


class DeepCacheEntry(fl.Chain, Adapter[fl.Module]):
    """Wraps input block 0: starts a pass (full or shallow), then runs the block."""

    def __init__(self, target: fl.Module, state: DeepCacheState) -> None:
        self._state = state
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, x: Tensor) -> Tensor:
        self._state.begin_pass(x)
        return self[0](x)

    def describe(self) -> str:
        return "DeepCacheEntry"


class DeepCacheSkip(fl.Chain, Adapter[fl.Module]):
    """Wraps a deep block: in a shallow pass it does not run (its input passes through unchanged)."""

    def __init__(self, target: fl.Module, state: DeepCacheState) -> None:
        self._state = state
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, x: Tensor) -> Tensor:
        if self._state.mode == SHALLOW:
            return x
        return self[0](x)

    def describe(self) -> str:
        return "DeepCacheSkip"


class DeepCacheStore(fl.Chain, Adapter[fl.Module]):
    """Wraps the last deep output block: a full pass keeps its output, a shallow pass returns the kept one."""

    def __init__(self, target: fl.Module, state: DeepCacheState) -> None:
        self._state = state
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, x: Tensor) -> Tensor:
        if self._state.mode == SHALLOW:
            return self._state.kept()
        features = self[0](x)
        self._state.keep(features)
        return features

    def describe(self) -> str:
        return "DeepCacheStore"


def max_depth(unet: UNet) -> int:
    """The deepest branch `inject_deep_cache` accepts: all input blocks but the last one run in shallow passes."""
    return len(unet.ensure_find(DownBlocks)) - 2


def inject_deep_cache(unet: UNet, state: DeepCacheState, depth: int = 1) -> list[fl.Chain]:
    """Wrap the UNet's blocks for DeepCache with branch `depth`; eject the returned adapters (reversed) to undo."""
    down, up = unet.ensure_find(DownBlocks), unet.ensure_find(UpBlocks)
    count = len(down)
    if len(up) != count:
        raise ValueError(f"DeepCache: the UNet has {count} input blocks but {len(up)} output blocks")
    if not 0 <= depth <= count - 2:
        raise ValueError(
            f"DeepCache: cache depth must be between 0 and {count - 2} for this UNet, got {depth}"
        )
    middle = unet.ensure_find(MiddleBlock)
    control = next(
        child for child in unet if isinstance(child, ControlResidual) or _wraps_type(child, ControlResidual)
    )
    middle_slot = next(child for child in unet if child is middle or _wraps_type(child, MiddleBlock))
    down_children, up_children = list(down), list(up)
    plan: list[tuple[type[fl.Chain], fl.Module, fl.Chain]] = [(DeepCacheEntry, down_children[0], down)]
    plan += [(DeepCacheSkip, child, down) for child in down_children[depth + 1 :]]
    plan += [(DeepCacheSkip, middle_slot, unet), (DeepCacheSkip, control, unet)]
    last_deep = count - 2 - depth
    plan += [(DeepCacheSkip, child, up) for child in up_children[:last_deep]]
    plan.append((DeepCacheStore, up_children[last_deep], up))
    adapters: list[fl.Chain] = []
    try:
        for kind, target, parent in plan:
            adapters.append(kind(target, state).inject(parent))  # type: ignore[call-arg]
    except BaseException:
        for adapter in reversed(adapters):
            adapter.eject()  # type: ignore[attr-defined]
        raise
    return adapters


def _wraps_type(module: fl.Module, wanted: type[fl.Module]) -> bool:
    return (
        isinstance(module, Adapter)
        and isinstance(module, fl.Chain)
        and any(isinstance(child, wanted) or _wraps_type(child, wanted) for child in module)
    )


class DeepCachePatch:
    """A `ModelPatch`: DeepCache for the run (a fresh cache each run; nothing when encoding text)."""

    def __init__(self, interval: int = 3, depth: int = 1, start: float = 0.0, end: float = 1.0) -> None:
        if interval < 1:
            raise ValueError(f"DeepCache: cache_interval must be >= 1, got {interval}")
        if depth < 0:
            raise ValueError(f"DeepCache: cache_depth must be >= 0, got {depth}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"DeepCache: need 0 <= start_percent <= end_percent <= 1, got {start}, {end}")
        self.interval, self.depth, self.start, self.end = interval, depth, start, end

    @property
    def label(self) -> str:
        return (
            f"DeepCache (interval {self.interval}, depth {self.depth}, steps {self.start:.0%}-{self.end:.0%})"
        )

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        state = DeepCacheState(self.interval, self.start, self.end, run.num_steps)
        adapters = inject_deep_cache(model.unet, state, self.depth)
        run.on_step(state.begin_step)

        def undo() -> None:
            for adapter in reversed(adapters):
                adapter.eject()  # type: ignore[attr-defined]
            state.cache.clear()

        return undo
