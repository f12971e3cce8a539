"""What the UNet is conditioned on, and several conditionings combined as ComfyUI combines them.

A `Conditioning` is one prompt's embeddings (text; for SDXL also the pooled text and the time ids). A
`ConditioningEntry` adds where and when it acts, with the meaning of an entry of ComfyUI's CONDITIONING list:
`strength`, an `area` of latent cells (or of fractions), a `mask` (`mask_strength`, `area_from_mask`), and the
`start_percent` / `end_percent` of the noise schedule during which it acts.

`CombinedConditioning` predicts for two lists of entries (positive, negative) as ComfyUI's `calc_cond_batch`
does at each step:

    denoised = sum_i mult_i * denoised_i / (sum_i mult_i + 1e-37)

over the entries active at the step's noise level, where `denoised_i` is the model's clean-image estimate for
entry i run on its area's crop, and `mult_i` = mask * mask_strength * strength on that crop (without a mask, an
area's inner edges fade in over 8 cells). A latent cell that no entry reaches is thus predicted as a zero image.
Before sampling, every area of one side that the other side lacks is added to it with the text of the smallest
entry around it (ComfyUI's `create_cond_with_same_area_if_none`). The combination is linear in the model's
output, so it runs on the prediction directly: `(sum_i mult_i * prediction_i + 1e-37 * zero_image) / (sum_i
mult_i + 1e-37)`, where `zero_image` is the prediction whose denoised image is 0.

Each UNet pass holds one entry per guidance side on the same crop (`[negative, positive]` with guidance, as the
plain path), so adapters see the batch layout they always see; a side with fewer entries on an area fills its
half with the other side's entry, and that half's output is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from .solvers import PredictionType

Area = tuple[int, int, int, int]
"""(height, width, top, left) in latent cells, as ComfyUI's `area` key."""

EMPTY_WEIGHT = 1e-37
"""ComfyUI's starting weight of every latent cell: where no entry acts, the denoised image is 0."""
AREA_FEATHER = 8
"""Cells over which an area without a mask fades in at its inner edges (at most a quarter of its size)."""
NO_START = 999999999.9
"""ComfyUI's noise level for start_percent 0: every step is below it."""


@dataclass(frozen=True)
class Conditioning:
    """What the UNet is conditioned on: the text embedding and, for SDXL, pooled text and time ids."""

    text_embedding: Tensor
    pooled_text_embedding: Tensor | None = None
    time_ids: Tensor | None = None

    def repeat(self, batch_size: int) -> Conditioning:
        """Repeat a one-item conditioning for a batch (items already batched are kept)."""

        def fit(tensor: Tensor | None) -> Tensor | None:
            if tensor is None or tensor.shape[0] == batch_size:
                return tensor
            if tensor.shape[0] != 1:
                raise ValueError(
                    f"conditioning batch {tensor.shape[0]} does not match latent batch {batch_size}"
                )
            return tensor.expand(batch_size, *tensor.shape[1:])

        return Conditioning(fit(self.text_embedding), fit(self.pooled_text_embedding), fit(self.time_ids))  # type: ignore[arg-type]

    def to_batch(self, batch_size: int) -> Conditioning:
        """ComfyUI's `repeat_to_batch_size` on every part: the first `batch_size` items, repeated cyclically."""

        def fit(tensor: Tensor | None) -> Tensor | None:
            if tensor is None or tensor.shape[0] == batch_size:
                return tensor
            if tensor.shape[0] > batch_size:
                return tensor[:batch_size]
            repeats = math.ceil(batch_size / tensor.shape[0])
            return tensor.repeat(repeats, *(1,) * (tensor.dim() - 1))[:batch_size]

        return Conditioning(fit(self.text_embedding), fit(self.pooled_text_embedding), fit(self.time_ids))  # type: ignore[arg-type]

    def to(self, device: torch.device, dtype: torch.dtype) -> Conditioning:
        def move(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        return replace(
            self,
            text_embedding=move(self.text_embedding),  # type: ignore[arg-type]
            pooled_text_embedding=move(self.pooled_text_embedding),
            time_ids=move(self.time_ids),
        )


@dataclass(frozen=True)
class SizeConditioning:
    """SDXL's micro-conditioning: original size, crop top-left and target size, in pixels."""

    original_size: tuple[int, int] = (1024, 1024)
    crop_top_left: tuple[int, int] = (0, 0)
    target_size: tuple[int, int] = (1024, 1024)

    @classmethod
    def for_image(cls, height: int, width: int) -> SizeConditioning:
        """diffusers' default for a (height, width) output: original = target = that size, no crop."""
        return cls((height, width), (0, 0), (height, width))

    def time_ids(self) -> Tensor:
        """(1, 6) as diffusers' `add_time_ids`: (height, width, top, left, target height, target width)."""
        return torch.tensor(
            [[*self.original_size, *self.crop_top_left, *self.target_size]], dtype=torch.float32
        )


def concatenate(first: Conditioning, second: Conditioning) -> Conditioning:
    """Stack two conditionings along the batch (CFG's `[negative, positive]`)."""

    def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
        if a is None or b is None:
            if a is not None or b is not None:
                raise ValueError("both conditionings must have the same parts (pooled text, time ids)")
            return None
        if a.shape[1:] != b.shape[1:]:
            a, b = _pad_to_same_length(a, b)
        return torch.cat([a, b])

    return Conditioning(
        cat(first.text_embedding, second.text_embedding),
        cat(first.pooled_text_embedding, second.pooled_text_embedding),
        cat(first.time_ids, second.time_ids),
    )  # type: ignore[arg-type]


def _pad_to_same_length(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Long prompts give longer embeddings: repeat both to the least common multiple of their lengths, as
    ComfyUI does (attention over a sequence repeated whole gives the same result)."""
    if a.dim() != 3 or a.shape[2] != b.shape[2]:
        raise ValueError(f"cannot batch text embeddings of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    length = math.lcm(a.shape[1], b.shape[1])
    return a.repeat(1, length // a.shape[1], 1), b.repeat(1, length // b.shape[1], 1)


@dataclass(frozen=True)
class ConditioningEntry:
    """A conditioning with where and when it acts: one entry of ComfyUI's CONDITIONING list.

    - `strength`: its weight against the other entries (ComfyUI's `strength`).
    - `area`: (height, width, top, left) in latent cells, or `area_fraction` the same as fractions of the
      latent size (ComfyUI's `("percentage", ...)` area); the model runs on that crop only.
    - `mask`: (H, W) or (B, H, W) at any size, resized bilinearly to the latent; its weight `mask_strength`;
      `area_from_mask` runs the model on the mask's bounding box (ComfyUI's `set_area_to_bounds`).
    - `start_percent` / `end_percent`: the part of the noise schedule where it acts, as ComfyUI's keys mean it
      (fractions of the model's timestep range from the noisiest end, compared on noise levels).
    """

    conditioning: Conditioning
    strength: float = 1.0
    area: Area | None = None
    area_fraction: tuple[float, float, float, float] | None = None
    mask: Tensor | None = field(default=None, repr=False)
    mask_strength: float = 1.0
    area_from_mask: bool = False
    start_percent: float = 0.0
    end_percent: float = 1.0

    @property
    def acts_everywhere(self) -> bool:
        """Whether it acts on the whole latent at every step with weight 1 (the same as its conditioning alone)."""
        return (
            self.strength == 1.0
            and self.area is None
            and self.area_fraction is None
            and self.mask is None
            and self.start_percent <= 0.0
            and self.end_percent >= 1.0
        )


def percent_to_sigma(percent: float, log_sigmas: Tensor) -> float:
    """ComfyUI's `percent_to_sigma`: the noise level at `percent` of the timestep range from its noisy end."""
    if percent <= 0.0:
        return NO_START
    if percent >= 1.0:
        return 0.0
    return float(sigma_at_timestep((1.0 - percent) * (len(log_sigmas) - 1), log_sigmas))


def sigma_at_timestep(timestep: float, log_sigmas: Tensor) -> Tensor:
    """The noise level of a (fractional) training timestep, interpolated in log sigma as ComfyUI does (float32)."""
    t = torch.tensor(float(timestep), dtype=torch.float32).clamp(0, len(log_sigmas) - 1)
    low, high = int(t.floor()), int(t.ceil())
    weight = t - low
    return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()


def training_log_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """log sqrt((1 - alpha_bar) / alpha_bar) of every training timestep, in float32 on the CPU."""
    alphas = alphas_cumprod.detach().float().cpu()
    return (((1 - alphas) / alphas) ** 0.5).log()


@dataclass(frozen=True)
class PlacedEntry:
    """An entry resolved for one latent size: its area in cells, its mask at the latent size, its noise window."""

    conditioning: Conditioning
    strength: float
    area: Area | None
    mask: Tensor | None
    mask_strength: float
    sigma_start: float
    sigma_end: float

    def active_at(self, sigma: float) -> bool:
        """ComfyUI skips an entry when the step's noise level is above its start or below its end."""
        return not (sigma > self.sigma_start or sigma < self.sigma_end)

    def crop(self, height: int, width: int) -> Area | None:
        """The area clamped to the latent (ComfyUI narrows an area that runs past the border)."""
        if self.area is None:
            return None
        area_height, area_width, top, left = self.area
        area_height, area_width = min(height - top, area_height), min(width - left, area_width)
        if area_height <= 0 or area_width <= 0:
            raise ValueError(
                f"a conditioning area {self.area} (height, width, top, left in latent cells) lies outside the "
                f"latent of {height}x{width} cells"
            )
        return area_height, area_width, top, left

    def weight(self, batch: int, channels: int, height: int, width: int) -> Tensor:
        """ComfyUI's `mult` for this entry on its crop: (batch, channels, crop height, crop width)."""
        crop = self.crop(height, width)
        area_height, area_width, top, left = crop if crop is not None else (height, width, 0, 0)
        if self.mask is not None:
            mask = self.mask[:batch, top : top + area_height, left : left + area_width] * self.mask_strength
            if batch % mask.shape[0]:
                raise ValueError(
                    f"a conditioning mask batch of {self.mask.shape[0]} does not fit the latent batch {batch}"
                )
            mult = mask[:, None].repeat(batch // mask.shape[0], channels, 1, 1) * self.strength
        else:
            mult = torch.full((batch, channels, area_height, area_width), self.strength)
        if self.mask is None and crop is not None:
            for dim, (size, offset, full) in enumerate(
                ((area_height, top, height), (area_width, left, width)), start=2
            ):
                ramp = min(AREA_FEATHER, size // 4)
                for index in range(ramp):
                    fade = (index + 1) / ramp
                    if offset != 0:
                        mult.narrow(dim, index, 1).mul_(fade)
                    if size + offset < full:
                        mult.narrow(dim, size - 1 - index, 1).mul_(fade)
        return mult


def place_entry(entry: ConditioningEntry, height: int, width: int, log_sigmas: Tensor) -> PlacedEntry:
    """Resolve an entry for a latent of height x width cells (ComfyUI's `resolve_areas_and_cond_masks`)."""
    area = entry.area
    if entry.area_fraction is not None:
        fraction_height, fraction_width, fraction_top, fraction_left = entry.area_fraction
        area = (
            max(1, round(fraction_height * height)),
            max(1, round(fraction_width * width)),
            round(fraction_top * height),
            round(fraction_left * width),
        )
    mask = entry.mask
    if mask is not None:
        mask = mask.float().cpu()
        if mask.dim() == 2:
            mask = mask[None]
        if mask.dim() == 4 and mask.shape[1] == 1:
            mask = mask[:, 0]
        if mask.dim() != 3:
            raise ValueError(f"a conditioning mask is (H, W) or (B, H, W), got shape {tuple(mask.shape)}")
        if tuple(mask.shape[1:]) != (height, width):
            mask = F.interpolate(mask[:, None], size=(height, width), mode="bilinear")[:, 0]
        if entry.area_from_mask:
            bounds = mask.abs().max(dim=0).values
            if not bool((bounds != 0).any()):
                area = (8, 8, 0, 0)  # ComfyUI's smallest area: the mask is empty, the entry adds nothing
            else:
                rows, columns = torch.where(bounds != 0)
                top, left = int(rows.min()), int(columns.min())
                area = (
                    max(8, int(rows.max()) - top + 1),
                    max(8, int(columns.max()) - left + 1),
                    top,
                    left,
                )
    return PlacedEntry(
        conditioning=entry.conditioning,
        strength=float(entry.strength),
        area=None if area is None else tuple(int(v) for v in area),  # type: ignore[arg-type]
        mask=mask,
        mask_strength=float(entry.mask_strength),
        sigma_start=percent_to_sigma(entry.start_percent, log_sigmas),
        sigma_end=percent_to_sigma(entry.end_percent, log_sigmas),
    )


def _area_inside(inner: Area, outer: Area) -> bool:
    for index in range(2):
        if inner[2 + index] < outer[2 + index]:
            return False
        if inner[index] + inner[2 + index] > outer[index] + outer[2 + index]:
            return False
    return True


def add_matching_area(side: list[PlacedEntry], entry: PlacedEntry) -> None:
    """Give `side` an entry on `entry`'s area when it has none there, with the text of its smallest entry
    around that area (ComfyUI's `create_cond_with_same_area_if_none`; the other keys come from `entry`)."""
    if entry.area is None:
        return
    smallest: PlacedEntry | None = None
    for candidate in side:
        if candidate.area is None:
            if smallest is None:
                smallest = candidate
        elif _area_inside(entry.area, candidate.area):
            if (
                smallest is None
                or smallest.area is None
                or math.prod(smallest.area[:2]) > math.prod(candidate.area[:2])
            ):
                smallest = candidate
    if smallest is None or smallest.area == entry.area:
        return
    side.append(replace(entry, conditioning=smallest.conditioning))


def zero_image_prediction(model_input: Tensor, sigma: Tensor, prediction_type: PredictionType) -> Tensor:
    """The model output whose denoised image is 0 for the unit-variance input `model_input` at noise `sigma`."""
    match prediction_type:
        case PredictionType.EPSILON:
            return model_input * ((sigma**2 + 1) ** 0.5 / sigma)
        case PredictionType.V_PREDICTION:
            return model_input / sigma
        case _:
            raise ValueError(f"combining conditioning entries is not defined for {prediction_type!r}")


Predict = Callable[[Tensor], Tensor]


class CombinedConditioning:
    """Positive and negative entries placed for one latent size; `predict` gives the guided model output."""

    def __init__(
        self,
        positive: Sequence[ConditioningEntry],
        negative: Sequence[ConditioningEntry] | None,
        latent_height: int,
        latent_width: int,
        alphas_cumprod: Tensor,
        prediction_type: PredictionType = PredictionType.EPSILON,
    ) -> None:
        if not positive:
            raise ValueError("the positive conditioning has no entries")
        if negative is not None and not negative:
            raise ValueError("the negative conditioning has no entries")
        self.height, self.width = latent_height, latent_width
        self.log_sigmas = training_log_sigmas(alphas_cumprod)
        self.prediction_type = prediction_type
        place = [place_entry(e, latent_height, latent_width, self.log_sigmas) for e in positive]
        self.positive: list[PlacedEntry] = place
        self.negative: list[PlacedEntry] = [
            place_entry(e, latent_height, latent_width, self.log_sigmas) for e in negative or ()
        ]
        for entry in list(self.positive):
            add_matching_area(self.negative, entry)
        for entry in list(self.negative):
            add_matching_area(self.positive, entry)

    @property
    def has_areas(self) -> bool:
        """Whether some entry runs the model on a crop smaller than the latent."""
        return any(
            entry.crop(self.height, self.width) not in (None, (self.height, self.width, 0, 0))
            for entry in (*self.positive, *self.negative)
        )

    def sigma(self, timestep: Tensor | float) -> Tensor:
        return sigma_at_timestep(float(timestep), self.log_sigmas)

    def passes(
        self, sigma: float, use_guidance: bool
    ) -> list[tuple[Area | None, PlacedEntry | None, PlacedEntry | None]]:
        """The UNet passes of a step: (crop, negative entry, positive entry), one entry per side on one crop."""
        sides = [[e for e in self.positive if e.active_at(sigma)]]
        if use_guidance:
            sides.append([e for e in self.negative if e.active_at(sigma)])
        crops: dict[Area | None, tuple[list[PlacedEntry], list[PlacedEntry]]] = {}
        for side, entries in enumerate(sides):
            for entry in entries:
                crops.setdefault(entry.crop(self.height, self.width), ([], []))[side].append(entry)
        passes: list[tuple[Area | None, PlacedEntry | None, PlacedEntry | None]] = []
        for crop, (positives, negatives) in crops.items():
            for index in range(max(len(positives), len(negatives))):
                positive = positives[index] if index < len(positives) else None
                negative = negatives[index] if index < len(negatives) else None
                passes.append((crop, negative, positive))
        return passes

    def predict(
        self,
        unet: Callable[[Tensor], Tensor],
        set_conditioning: Callable[[Conditioning], None],
        model_input: Tensor,
        timestep: Tensor,
        guidance_scale: float,
        use_guidance: bool,
        output_dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """The guided prediction for `model_input` (B, C, h, w) at `timestep`, combining every active entry.

        `unet(x)` runs one pass (adapters and regions included) after `set_conditioning` set its embeddings.
        """
        sigma = self.sigma(timestep)
        batch = model_input.shape[0]
        sums: list[Tensor | None] = [None, None]  # positive, negative
        weights: list[Tensor | None] = [None, None]
        for crop, negative, positive in self.passes(float(sigma), use_guidance):
            area_height, area_width, top, left = crop if crop is not None else (self.height, self.width, 0, 0)
            x = model_input[..., top : top + area_height, left : left + area_width]
            halves = [negative, positive] if use_guidance else [positive]
            filled = [half if half is not None else (positive or negative) for half in halves]
            conditioning = filled[0].conditioning.to_batch(batch)  # type: ignore[union-attr]
            for entry in filled[1:]:
                conditioning = concatenate(conditioning, entry.conditioning.to_batch(batch))  # type: ignore[union-attr]
            set_conditioning(conditioning)
            output = unet(torch.cat([x] * len(halves))).to(output_dtype).chunk(len(halves))
            for side, entry, prediction in zip([1, 0] if use_guidance else [0], halves, output):
                if entry is None:  # this half only filled the batch
                    continue
                channels = prediction.shape[1]
                if sums[side] is None:
                    shape = (batch, channels, self.height, self.width)
                    sums[side] = torch.zeros(shape, dtype=output_dtype, device=prediction.device)
                    weights[side] = torch.zeros(shape, dtype=output_dtype, device=prediction.device)
                mult = entry.weight(batch, channels, self.height, self.width).to(prediction)
                rows, columns = slice(top, top + area_height), slice(left, left + area_width)
                sums[side][..., rows, columns] += prediction * mult  # type: ignore[index]
                weights[side][..., rows, columns] += mult  # type: ignore[index]
        channels = next((s.shape[1] for s in sums if s is not None), None)
        noisy = model_input[:, : channels or 4].to(output_dtype)
        zero = zero_image_prediction(noisy, sigma.to(noisy), self.prediction_type)

        def combined(side: int) -> Tensor:
            total, weight = sums[side], weights[side]
            if total is None or weight is None:
                return zero.clone()
            return (total + EMPTY_WEIGHT * zero) / (weight + EMPTY_WEIGHT)

        conditional = combined(0)
        if not use_guidance:
            return conditional
        unconditional = combined(1)
        return unconditional + guidance_scale * (conditional - unconditional)


__all__ = [
    "AREA_FEATHER",
    "EMPTY_WEIGHT",
    "Area",
    "CombinedConditioning",
    "Conditioning",
    "ConditioningEntry",
    "PlacedEntry",
    "SizeConditioning",
    "add_matching_area",
    "concatenate",
    "percent_to_sigma",
    "place_entry",
    "sigma_at_timestep",
    "training_log_sigmas",
    "zero_image_prediction",
]
