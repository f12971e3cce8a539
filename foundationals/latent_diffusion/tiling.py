"""MultiDiffusion: tiled model evaluation for latents larger than the model's native size.

Bar-Tal et al. 2023 ("MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation"), as diffusers'
`StableDiffusionPanoramaPipeline` runs it: at every step the latent is cut into overlapping tiles (views), the
model (with classifier-free guidance) is evaluated on each tile, and the per-tile results are averaged where
tiles overlap. diffusers averages each view's next latents (one scheduler step per view); here the tiles'
*predictions* are averaged and the run's solver takes one step on the whole latent. For DDIM (deterministic) a
step is affine in the prediction with coefficients of the step alone, so both are the same computation up to
float rounding (the parity test compares them); for multistep solvers (DPM++ 2M...) averaging predictions keeps
one solver history for the whole latent instead of one per view.

`TiledPrediction` is a wrapper around the sampling loop's model evaluation (`sampling.denoise(tiles=...)`): the
solvers, guidance hooks, conditioning entries (areas, masks, timestep ranges: MultiDiffusion's region-based
generation is ComfyUI's mask conditioning, each entry cropped to each tile) and the model's adapters are those of
a plain run. Before each tile it announces the tile's window (`SamplingRun.set_window`), so adapters with spatial
inputs covering the whole latent crop them (a ControlNet's hint: ControlNet tile upscaling).

Blending: "uniform" averages the tiles (the paper, diffusers); "gaussian" weighs each tile by a Gaussian bump
centred on it (Mixture of Diffusers' weights, variance 0.01 of the tile size squared), which feathers the seams.
Tiles are laid out from the top-left corner every `stride` cells; when the latent is not a whole number of
strides, one more tile is placed against the far edge (diffusers' layout otherwise, which leaves such a border
uncovered).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from .conditioning import Area, CombinedConditioning, PlacedEntry

if TYPE_CHECKING:
    from .model_patch import SamplingRun, Undo
    from .stable_diffusion import StableDiffusion

Window = Area
"""(height, width, top, left) of a tile, in latent cells (the same convention as conditioning areas)."""
Blend = Literal["uniform", "gaussian"]
BLENDS: tuple[str, ...] = ("uniform", "gaussian")
GAUSSIAN_VARIANCE = 0.01
"""Variance of the Gaussian tile weight, in units of the tile size squared (Mixture of Diffusers' value)."""


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Offsets of the tiles along one side: every `stride` cells, plus one against the far edge if needed."""
    if tile >= size:
        return [0]
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] != size - tile:
        starts.append(size - tile)
    return starts


@dataclass(frozen=True)
class TileLayout:
    """How to tile a latent: tile size and stride in latent cells, and how overlapping tiles are blended."""

    tile_height: int
    tile_width: int
    stride_height: int
    stride_width: int
    blend: Blend = "uniform"

    def __post_init__(self) -> None:
        for name in ("tile_height", "tile_width", "stride_height", "stride_width"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"tiling: {name} must be at least 1 latent cell, got {getattr(self, name)}")
        if self.stride_height > self.tile_height or self.stride_width > self.tile_width:
            raise ValueError(
                f"tiling: a stride ({self.stride_height}x{self.stride_width}) larger than the tile "
                f"({self.tile_height}x{self.tile_width}) would leave gaps between tiles"
            )
        if self.blend not in BLENDS:
            raise ValueError(f"tiling: unknown blend {self.blend!r}; choose one of {', '.join(BLENDS)}")

    @classmethod
    def from_pixels(
        cls, tile_width: int, tile_height: int, overlap: int, factor: int, blend: Blend = "uniform"
    ) -> TileLayout:
        """A layout from sizes in pixels (ComfyUI-style: tile width / height and their overlap), `factor`
        pixels per latent cell. Sizes are rounded down to whole cells (a tile is at least one)."""
        if overlap < 0:
            raise ValueError(f"tiling: the overlap must be 0 or more pixels, got {overlap}")
        if overlap >= min(tile_width, tile_height):
            raise ValueError(
                f"tiling: the overlap ({overlap} px) must be smaller than the tile ({tile_width}x{tile_height} px)"
            )
        height, width = max(1, tile_height // factor), max(1, tile_width // factor)
        cells = overlap // factor
        return cls(height, width, max(1, height - cells), max(1, width - cells), blend)

    def windows(self, height: int, width: int) -> list[Window]:
        """The tiles of a height x width latent, row by row (diffusers' order); a tile never exceeds the latent."""
        tile_height, tile_width = min(self.tile_height, height), min(self.tile_width, width)
        return [
            (tile_height, tile_width, top, left)
            for top in tile_starts(height, tile_height, self.stride_height)
            for left in tile_starts(width, tile_width, self.stride_width)
        ]


def tile_weight(height: int, width: int, blend: Blend) -> Tensor:
    """(height, width) weight of one tile's prediction in the average (float32)."""
    if blend == "uniform":
        return torch.ones(height, width)

    def bump(size: int) -> Tensor:
        position = (torch.arange(size, dtype=torch.float64) + 0.5) / size - 0.5
        return torch.exp(-(position**2) / (2 * GAUSSIAN_VARIANCE))

    return (bump(height)[:, None] * bump(width)[None, :]).float()


EvaluateWindow = Callable[[Tensor, Window], Tensor]
"""The model evaluation of one tile: (the tile's model input, its window) -> the tile's prediction."""


class TiledPrediction:
    """MultiDiffusion for one run: evaluate the model on each tile and average the predictions."""

    def __init__(
        self,
        layout: TileLayout,
        height: int,
        width: int,
        set_window: Callable[[Window | None], None] | None = None,
    ) -> None:
        self.layout = layout
        self.height, self.width = height, width
        self.windows = layout.windows(height, width)
        self._set_window = set_window
        self._weights: dict[tuple[int, int], Tensor] = {}
        self._totals: dict[tuple[str, torch.dtype], Tensor] = {}
        self._tile_weights: dict[tuple[Window, str, torch.dtype], Tensor] = {}
        self._conditioning: dict[tuple[int, Window], CombinedConditioning] = {}

    @property
    def tile_count(self) -> int:
        return len(self.windows)

    def _weight(self, window: Window, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The tile's weight divided by the total weight on each of its cells (computed in float64, made once):
        the weighted predictions then only need adding up (one tile covering the latent gets exactly 1)."""
        key = (window, str(device), dtype)
        if key not in self._tile_weights:
            tile_height, tile_width, top, left = window
            total = self._total_float64()[top : top + tile_height, left : left + tile_width]
            weight = tile_weight(tile_height, tile_width, self.layout.blend).double() / total
            self._tile_weights[key] = weight.to(device, dtype)
        return self._tile_weights[key]

    def _total_float64(self) -> Tensor:
        total = torch.zeros(self.height, self.width, dtype=torch.float64)
        for window in self.windows:
            tile_height, tile_width, top, left = window
            weight = tile_weight(tile_height, tile_width, self.layout.blend).double()
            total[top : top + tile_height, left : left + tile_width] += weight
        return total

    def _total(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The number of tiles on each latent cell (uniform blending; every cell is covered by at least one)."""
        key = (str(device), dtype)
        if key not in self._totals:
            self._totals[key] = self._total_float64().to(device=device, dtype=dtype)
        return self._totals[key]

    def set_window(self, window: Window | None) -> None:
        if self._set_window is not None:
            self._set_window(window)

    def predict(self, model_input: Tensor, evaluate: EvaluateWindow) -> Tensor:
        """The averaged prediction for the whole `model_input` (B, C, h, w), one `evaluate` call per tile."""
        if tuple(model_input.shape[-2:]) != (self.height, self.width):
            raise ValueError(
                f"tiling was set up for a {self.height}x{self.width} latent, got {tuple(model_input.shape[-2:])}"
            )
        uniform = self.layout.blend == "uniform"
        value: Tensor | None = None
        try:
            for window in self.windows:
                tile_height, tile_width, top, left = window
                self.set_window(window)
                rows, columns = slice(top, top + tile_height), slice(left, left + tile_width)
                prediction = evaluate(model_input[..., rows, columns], window)
                if value is None:
                    shape = (*prediction.shape[:-2], self.height, self.width)
                    value = torch.zeros(shape, dtype=prediction.dtype, device=prediction.device)
                if not uniform:
                    prediction = prediction * self._weight(window, prediction.device, prediction.dtype)
                value[..., rows, columns] += prediction
        finally:
            self.set_window(None)
        assert value is not None  # a layout has at least one tile
        # uniform: the sum divided by the count per cell, as diffusers averages; weighted: already normalised
        return value / self._total(value.device, value.dtype) if uniform else value

    def conditioning(self, combined: CombinedConditioning, window: Window) -> CombinedConditioning:
        """`combined` (placed for the whole latent) as seen on one tile: every entry cropped to it (made once)."""
        key = (id(combined), window)
        if key not in self._conditioning:
            self._conditioning[key] = WindowConditioning(combined, window)
        return self._conditioning[key]


@dataclass(frozen=True)
class WindowEntry(PlacedEntry):
    """A placed entry cropped to a tile: its area is the part inside the tile, its weight the whole latent's
    weight on that part (so an area's feathered edges and a mask stay where they are on the whole latent)."""

    source: PlacedEntry = field(default=None, repr=False)  # type: ignore[assignment]
    full_size: tuple[int, int] = (0, 0)
    offset: tuple[int, int] = (0, 0)
    """Where the cropped area starts inside the source entry's own area."""
    _weights: dict[tuple[int, int], Tensor] = field(default_factory=dict, repr=False, compare=False)

    def weight(self, batch: int, channels: int, height: int, width: int) -> Tensor:
        key = (batch, channels)
        if key not in self._weights:
            whole = self.source.weight(batch, channels, *self.full_size)
            area = self.crop(height, width)
            area_height, area_width = (height, width) if area is None else area[:2]
            top, left = self.offset
            self._weights[key] = whole[..., top : top + area_height, left : left + area_width]
        return self._weights[key]


def _crop_entry(entry: PlacedEntry, full: tuple[int, int], window: Window) -> WindowEntry | None:
    """`entry` restricted to `window`, in the window's coordinates; None when it does not reach the window."""
    area = entry.crop(*full) or (full[0], full[1], 0, 0)
    area_height, area_width, area_top, area_left = area
    tile_height, tile_width, tile_top, tile_left = window
    top, left = max(area_top, tile_top), max(area_left, tile_left)
    bottom = min(area_top + area_height, tile_top + tile_height)
    right = min(area_left + area_width, tile_left + tile_width)
    if bottom <= top or right <= left:
        return None
    inside = (bottom - top, right - left, top - tile_top, left - tile_left)
    return WindowEntry(
        conditioning=entry.conditioning,
        strength=entry.strength,
        area=None if inside == (tile_height, tile_width, 0, 0) else inside,
        mask=None,
        mask_strength=entry.mask_strength,
        sigma_start=entry.sigma_start,
        sigma_end=entry.sigma_end,
        source=entry,
        full_size=full,
        offset=(top - area_top, left - area_left),
    )


class WindowConditioning(CombinedConditioning):
    """A `CombinedConditioning` restricted to one tile (see `TiledPrediction.conditioning`)."""

    def __init__(self, combined: CombinedConditioning, window: Window) -> None:  # noqa: D107
        full = (combined.height, combined.width)
        self.height, self.width = window[0], window[1]
        self.log_sigmas = combined.log_sigmas
        self.prediction_type = combined.prediction_type

        def cropped(entries: Sequence[PlacedEntry]) -> list[PlacedEntry]:
            return [e for e in (_crop_entry(entry, full, window) for entry in entries) if e is not None]

        self.positive = cropped(combined.positive)
        self.negative = cropped(combined.negative)


def tile_summary(layout: TileLayout, height: int, width: int) -> str:
    """E.g. "6 tiles of 32x32 cells (stride 24x24, uniform)" for messages and logs."""
    windows = layout.windows(height, width)
    tile_height, tile_width = windows[0][:2]
    return (
        f"{len(windows)} tile{'s' * (len(windows) != 1)} of {tile_height}x{tile_width} cells "
        f"(stride {layout.stride_height}x{layout.stride_width}, {layout.blend})"
    )


@dataclass(frozen=True)
class TiledDiffusionPatch:
    """The `ModelPatch` of tiled sampling: the run samples with `layout` (MultiDiffusion) instead of the plain path.

    It changes no module of the model: it sets the run's `tiling`, which `StableDiffusion.sample` reads, and the
    undo clears it. Adapters that follow the tiles (ControlNet hints) do so through `SamplingRun.on_window`.
    """

    layout: TileLayout

    @property
    def label(self) -> str:
        layout = self.layout
        return (
            f"tiled diffusion ({layout.tile_height}x{layout.tile_width} cells, stride "
            f"{layout.stride_height}x{layout.stride_width}, {layout.blend})"
        )

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None  # text encoding: nothing to tile
        if run.tiling is not None:
            raise ValueError("the model has two Tiled Diffusion patches: keep one")
        run.tiling = self.layout

        def undo() -> None:
            run.tiling = None

        return undo


__all__ = [
    "BLENDS",
    "GAUSSIAN_VARIANCE",
    "TileLayout",
    "TiledDiffusionPatch",
    "TiledPrediction",
    "Window",
    "WindowConditioning",
    "tile_starts",
    "tile_summary",
    "tile_weight",
]
