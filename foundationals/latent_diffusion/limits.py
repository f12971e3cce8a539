"""Size limits shared by the pipelines and the nodes: refuse a huge request before allocating anything."""

from __future__ import annotations

MAX_RESOLUTION = 16384
"""The largest width or height, in pixels, accepted anywhere (ComfyUI's MAX_RESOLUTION)."""
MAX_BATCH_PIXELS = MAX_RESOLUTION * MAX_RESOLUTION
"""The most pixels a batch may hold (batch x height x width): one 16384x16384 image, or 64 of 2048x2048."""


def check_size(batch: int, height: int, width: int, what: str) -> None:
    """Refuse a batch past the size limits, before anything of that size is allocated or computed."""
    if height > MAX_RESOLUTION or width > MAX_RESOLUTION:
        raise ValueError(
            f"{what} of {width}x{height} pixels is larger than the limit of {MAX_RESOLUTION} pixels per side"
        )
    total = batch * height * width
    if total > MAX_BATCH_PIXELS:
        raise ValueError(
            f"{what}: {batch} x {width}x{height} is {total:,} pixels, above the limit of {MAX_BATCH_PIXELS:,} "
            f"pixels per batch ({MAX_RESOLUTION}x{MAX_RESOLUTION}); lower the batch size or the image size"
        )
