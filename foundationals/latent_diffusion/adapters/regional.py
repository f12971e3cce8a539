"""Regional adapters: a LoRA or IP-Adapter restricted to a mask, by blending UNet predictions.

A mask gate inside the layers alone cannot keep the rest of the image unchanged: convolutions and
attention carry a masked layer's output everywhere a few layers later. So each step runs the UNet once
with every regional adapter off (the base prediction) and once per active region with that region's
adapters on, and blends:

    prediction = base + sum_i w_i * (prediction_i - base),  w_i = mask_i / max(1, sum_j mask_j)

Outside every mask the prediction is the base one exactly; where masks overlap their effects are
averaged. Inside its own pass a region's adapters are also gated by the mask resized to each layer's grid
(every UNet resolution), so the region's features stay in the region. A region outside its start/end
window costs nothing: no extra pass.

Blending predictions keeps each step exact outside the masks, but the base model mixes the whole latent,
so over a run the outside drifts a little from the image without the adapters. A region with
`keep_outside` asks for the outside to stay exactly that image: the run first samples without regions,
then samples with them and puts the first run's latents back outside the masks after every step (as
inpainting keeps the unmasked source), for one more UNet pass per step.

Regions switch through the Context API: during a region's pass the UNet's context `REGIONS_CONTEXT` holds
`{"active": region name, "mask": latent mask, "region": the Region}`, which `RegionGate`s read; at any other
time it is absent and every regional adapter is off. A region keeps its mask on the device and on each
layer's grid once made (`Region.mask_on`): no step copies or resizes it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from copy import deepcopy
from dataclasses import dataclass, field
from itertools import count
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....fluxion import layers as fl
from ..resizing import resize_mask
from ..sampling import Denoiser, PromptConditioning, StepCallback, denoise
from ..solvers import Solver

if TYPE_CHECKING:
    from ..model_patch import SamplingRun

REGIONS_CONTEXT = "regions"
_REGION_IDS = count()


def new_region_name(label: str) -> str:
    """A region name unique in this process (two patches of the same file get two regions)."""
    return f"{label}#{next(_REGION_IDS)}"


@dataclass
class Region:
    """A part of the latent where some adapters act, on steps whose progress is in [start, end).

    `mask` is (1 or B, 1, h, w) at the latent size, in 0..1. `switch(on)` is called around the region's
    pass for adapters that are not gated by `RegionGate` (e.g. an IP-Adapter's scale). With `keep_outside`
    the run keeps the latents outside every region on the trajectory without regions (see
    `StableDiffusion.sample`): the final latents there equal those of a run without the regional adapters.
    """

    name: str
    mask: Tensor
    start: float = 0.0
    end: float = 1.0
    switch: Callable[[bool], None] | None = None
    keep_outside: bool = False
    _prepared: dict[tuple[object, ...], Tensor] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"region start/end must satisfy 0 <= start <= end <= 1, got {self.start}, {self.end}"
            )
        if self.mask.dim() != 4 or self.mask.shape[1] != 1:
            raise ValueError(
                f"a region mask is (B, 1, h, w) at the latent size, got {tuple(self.mask.shape)}"
            )

    def active_at(self, progress: float) -> bool:
        return self.start <= progress and (progress < self.end or self.end >= 1.0)

    def mask_on(
        self, device: torch.device, dtype: torch.dtype, size: tuple[int, int] | None = None
    ) -> Tensor:
        """The mask on `device` in `dtype`, resized (bilinear) to `size` when given: made once per run (a region
        lives for one run) and reused by every step and layer, so no step copies it to the device again."""
        key = (str(device), dtype, size)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = self.mask.to(device=device, dtype=dtype)
            if size is not None:
                prepared = resize_mask(prepared, size, "bilinear")
            self._prepared[key] = prepared
        return prepared


def latent_region_mask(mask: Tensor, latent_height: int, latent_width: int) -> Tensor:
    """A mask (H, W), (B, H, W) or (B, 1, H, W) in 0..1 at any resolution → (B, 1, h, w) at the latent size.

    Resized by area averaging, so a latent cell is 0 only when its whole pixel patch is outside the mask.
    """
    if mask.dim() == 2:
        mask = mask[None]
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"a region mask is (H, W), (B, H, W) or (B, 1, H, W), got {tuple(mask.shape)}")
    if not torch.isfinite(mask).all():
        raise ValueError("the region mask contains NaN or infinite values")
    mask = mask.float().clamp(0, 1)
    return resize_mask(mask, (latent_height, latent_width), "antialiased").clamp(0, 1)


def _fit_batch(mask: Tensor, batch: int) -> Tensor:
    """A mask of batch 1 or B for a UNet batch of B or 2B (`[negative, positive]` with guidance)."""
    if mask.shape[0] in (1, batch):
        return mask
    if batch % mask.shape[0] == 0:
        return mask.repeat(batch // mask.shape[0], *(1,) * (mask.dim() - 1))
    raise ValueError(f"a region mask batch of {mask.shape[0]} does not fit the UNet batch {batch}")


class RegionGate(fl.ContextModule):
    """Passes an adapter's output only during its region's pass, multiplied by the mask on the layer's grid.

    Feature maps (B, C, H, W) get the mask resized to (H, W); token sequences (B, H*W, C) inside a spatial
    transformer get it on that block's grid; other outputs (per-sample vectors) pass unmasked.
    """

    def __init__(self, region: str) -> None:
        super().__init__()
        self.region = region

    def forward(self, x: Tensor) -> Tensor:
        parent = self.parent
        state = parent.provider.get_context(REGIONS_CONTEXT) if parent is not None else None
        if not state or state.get("active") != self.region:
            return torch.zeros_like(x)
        region: Region = state["region"]
        if x.dim() == 4:
            grid = region.mask_on(x.device, x.dtype, (int(x.shape[-2]), int(x.shape[-1])))
            return x * _fit_batch(grid, x.shape[0])
        if x.dim() == 3:
            size = self._token_grid(x.shape[1])
            if size is not None:
                grid = region.mask_on(x.device, x.dtype, size).flatten(1)[..., None]
                return x * _fit_batch(grid, x.shape[0])
        return x

    def _token_grid(self, tokens: int) -> tuple[int, int] | None:
        parent = self.parent
        spatial = parent.provider.get_context("spatial_transformer") if parent is not None else None
        image = spatial.get("image") if spatial else None
        if image is None or image.shape[-2] * image.shape[-1] != tokens:
            return None
        return int(image.shape[-2]), int(image.shape[-1])

    def __repr__(self) -> str:
        return f"RegionGate(region={self.region!r})"


@contextmanager
def region_pass(unet: fl.Chain, region: Region) -> Iterator[None]:
    """Within the block `region`'s adapters are on; outside it (no regions context) every regional one is off."""
    state: dict[str, Any] = {"active": region.name, "mask": region.mask, "region": region}
    unet.set_context(REGIONS_CONTEXT, state)
    try:
        if region.switch is not None:
            region.switch(True)
        yield
    finally:
        try:
            if region.switch is not None:
                region.switch(False)
        finally:
            unet.provider.contexts.pop(REGIONS_CONTEXT, None)


def blend_region_predictions(unet: fl.Chain, x: Tensor, regions: Sequence[Region], progress: float) -> Tensor:
    """The base prediction for `x` with each region active at `progress` blended in (see the module doc)."""
    base = unet(x)
    active = [region for region in regions if region.active_at(progress)]
    if not active:
        return base
    masks = [_fit_batch(region.mask_on(base.device, base.dtype), base.shape[0]) for region in active]
    normalizer = sum(masks[1:], masks[0]).clamp(min=1.0)
    prediction = base
    for region, mask in zip(active, masks):
        with region_pass(unet, region):
            regional = unet(x)
        prediction = prediction + (mask / normalizer) * (regional - base)
    return prediction


def outside_of_regions(regions: Sequence[Region], batch: int) -> Tensor:
    """1 where no region reaches, 0 inside any region (fractional at soft edges), for a latent batch."""
    masks = [_fit_batch(region.mask, batch) for region in regions]
    return 1.0 - sum(masks[1:], masks[0]).clamp(0.0, 1.0)


def sample_keeping_outside(
    unet: Denoiser,
    run: SamplingRun,
    solver: Solver,
    latents: Tensor,
    positive: PromptConditioning,
    negative: PromptConditioning | None,
    generator: torch.Generator,
    callback: StepCallback | None,
    predict: Callable[[Tensor], Tensor],
    options: dict[str, Any],
) -> Tensor:
    """Sample without the run's regions, then with them, holding the outside to the first trajectory.

    Both passes draw the same random numbers as a run without regions would (the generator's state is
    copied), so the latents outside every region end exactly as that run's. Progress counts both.
    """
    total = 2 * len(solver.inference_steps)
    base_generator = torch.Generator(generator.device)
    base_generator.set_state(generator.get_state())
    trajectory: list[Tensor] = []

    def record(done: int, _: int, current: Tensor) -> None:
        trajectory.append(current.clone())
        if callback is not None:
            callback(done, total, current)

    with run.without_regions():
        denoise(
            unet,
            deepcopy(solver),
            latents,
            positive,
            negative,
            generator=base_generator,
            callback=record,
            predict=predict,
            **options,
        )
    outside = outside_of_regions(run.regions, latents.shape[0]).to(latents)

    def hold_outside(index: int, current: Tensor) -> Tensor:
        return outside * trajectory[index] + (1 - outside) * current

    def report(done: int, _: int, current: Tensor) -> None:
        if callback is not None:
            callback(len(trajectory) + done, total, current)

    return denoise(
        unet,
        solver,
        latents,
        positive,
        negative,
        generator=generator,
        callback=report,
        predict=predict,
        after_step=hold_outside,
        **options,
    )
