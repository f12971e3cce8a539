"""A Canny edge detector in pure torch, for ControlNet hints: IMAGE (B,H,W,C in [0, 1]) -> edge IMAGE (B,H,W,3).

Steps: luminance, 5x5 Gaussian blur (sigma 1), Sobel gradients, non-maximum suppression along the
gradient direction (quantised to 0/45/90/135 degrees), double threshold, hysteresis (weak edges kept
where they connect to strong ones, by repeated 3x3 dilation).

Thresholds apply to the (unnormalised Sobel) gradient magnitude of the [0, 1] luminance, as in ComfyUI's
Canny node (kornia; its widgets run 0.01..0.99). Thresholds above 1 are read as OpenCV's 0..255 scale and
divided by 255, which maps `cv2.Canny(image_uint8, low, high)` thresholds onto the same magnitudes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

LUMINANCE = (0.299, 0.587, 0.114)


def _gaussian_kernel(size: int = 5, sigma: float = 1.0) -> Tensor:
    positions = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    weights = torch.exp(-(positions**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    return torch.outer(weights, weights)


def _filter(image: Tensor, kernel: Tensor) -> Tensor:
    pad = kernel.shape[-1] // 2
    padded = F.pad(image, (pad, pad, pad, pad), mode="replicate")
    return F.conv2d(padded, kernel[None, None].to(image))


def _shifted(values: Tensor, dy: int, dx: int) -> Tensor:
    """`values[y + dy, x + dx]` at each (y, x), zero outside the image."""
    padded = F.pad(values, (1, 1, 1, 1))
    height, width = values.shape[-2:]
    return padded[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]


def _as_unit_threshold(value: float) -> float:
    return value / 255.0 if value > 1.0 else value


def canny(image: Tensor, low_threshold: float = 0.4, high_threshold: float = 0.8) -> Tensor:
    """Edges of (B,H,W,C) images in [0, 1] as a (B,H,W,3) image of 0s and 1s (thresholds: see the module doc)."""
    low, high = _as_unit_threshold(low_threshold), _as_unit_threshold(high_threshold)
    if low > high:
        raise ValueError(
            f"the low threshold ({low_threshold}) must not exceed the high one ({high_threshold})"
        )
    if image.dim() == 3:
        image = image[None]
    if not torch.isfinite(image).all():  # NaN would compare False everywhere: an empty edge map, silently
        raise ValueError("the image to find edges in contains NaN or infinite values")
    pixels = image.movedim(-1, 1).float()
    if pixels.shape[1] >= 3:
        weights = torch.tensor(LUMINANCE, device=pixels.device).view(1, 3, 1, 1)
        gray = (pixels[:, :3] * weights).sum(dim=1, keepdim=True)
    else:
        gray = pixels[:, :1]
    blurred = _filter(gray, _gaussian_kernel().to(gray.device))
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=gray.device)
    gradient_x, gradient_y = _filter(blurred, sobel_x), _filter(blurred, sobel_x.T)
    magnitude = torch.sqrt(gradient_x**2 + gradient_y**2)

    # Non-maximum suppression: keep a pixel only if it is the largest along its gradient direction.
    angle = torch.rad2deg(torch.atan2(gradient_y, gradient_x)) % 180.0
    sector = (
        torch.round(angle / 45.0).long() % 4
    )  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135 degrees
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in enumerate(((0, 1), (1, 1), (1, 0), (1, -1))):
        is_max = (magnitude >= _shifted(magnitude, dy, dx)) & (magnitude > _shifted(magnitude, -dy, -dx))
        keep |= (sector == index) & is_max
    thin = magnitude * keep

    # Double threshold and hysteresis.
    strong = thin >= high
    weak = thin >= low
    edges = strong
    for _ in range(math.prod(thin.shape[-2:])):
        grown = (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0) & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return edges.float().movedim(1, -1).expand(*edges.shape[:1], *edges.shape[2:], 3).contiguous()
