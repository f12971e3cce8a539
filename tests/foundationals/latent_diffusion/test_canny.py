"""The pure-torch Canny edge detector on synthetic images."""

from __future__ import annotations

import pytest
import torch

from foundationals.latent_diffusion.canny import canny


def white_square(value: float = 1.0) -> torch.Tensor:
    image = torch.zeros(1, 32, 32, 3)
    image[:, 8:24, 8:24] = value
    return image


def test_edges_of_a_white_square_are_its_outline():
    edges = canny(white_square(), 0.2, 0.5)
    assert edges.shape == (1, 32, 32, 3) and set(edges.unique().tolist()) <= {0.0, 1.0}
    mask = edges[0, :, :, 0] > 0
    rows, columns = mask.nonzero(as_tuple=True)
    assert rows.min() >= 6 and rows.max() <= 25 and columns.min() >= 6 and columns.max() <= 25
    assert not mask[11:21, 11:21].any()  # nothing inside the square
    assert not mask[:5].any() and not mask[27:].any()  # nothing far outside
    for line in (mask[16], mask[:, 16]):  # each side crossed once: one edge pixel left, one right
        found = line.nonzero().flatten().tolist()
        assert len(found) == 2 and found[0] in (7, 8) and found[1] in (23, 24)


def test_thresholds_matter():
    faint = white_square(0.15)  # gradient magnitude about 0.3 at the border
    assert canny(faint, 0.1, 0.2).sum() > 0
    assert canny(faint, 0.4, 0.8).sum() == 0
    assert canny(faint, 25, 50).sum() == canny(faint, 25 / 255, 50 / 255).sum()  # OpenCV 0..255 scale
    assert canny(torch.zeros(2, 16, 16, 3), 0.01, 0.02).sum() == 0


def test_low_above_high_is_refused():
    with pytest.raises(ValueError, match="low threshold"):
        canny(white_square(), 0.8, 0.4)
