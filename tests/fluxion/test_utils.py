"""Weight I/O and small utilities."""

import numpy as np
import pytest
import torch
from PIL import Image

import fluxion.layers as fl
from fluxion.utils import (
    image_to_tensor,
    interpolate,
    load_from_safetensors,
    load_metadata_from_safetensors,
    manual_seed,
    normalize,
    save_to_safetensors,
    summarize_tensor,
    tensor_to_image,
)


def test_safetensors_roundtrip_with_metadata_dtype_and_subset(tmp_path):
    chain = fl.Chain(fl.Linear(3, 4), fl.LayerNorm(4))
    path = tmp_path / "weights.safetensors"
    save_to_safetensors(path, chain.state_dict(), metadata={"kind": "test"})
    assert load_metadata_from_safetensors(path) == {"kind": "test"}
    loaded = load_from_safetensors(path, dtype=torch.float16)
    assert set(loaded) == set(chain.state_dict()) and all(t.dtype == torch.float16 for t in loaded.values())
    assert set(load_from_safetensors(path, keys=["Linear.bias"])) == {"Linear.bias"}
    other = fl.Chain(fl.Linear(3, 4), fl.LayerNorm(4)).load_from_safetensors(path)
    x = torch.randn(2, 3)
    assert torch.equal(other(x), chain(x))


def test_image_tensor_roundtrip():
    image = Image.new("RGB", (5, 3), (255, 128, 0))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 3, 5) and tensor[0, 0, 0, 0] == 1.0
    assert (np.asarray(tensor_to_image(tensor)) == np.asarray(image)).all()
    with pytest.raises(ValueError, match="channels"):
        tensor_to_image(torch.zeros(1, 2, 4, 4))


def test_seed_normalize_interpolate_summary():
    manual_seed(7)
    a = torch.randn(3)
    manual_seed(7)
    assert torch.equal(a, torch.randn(3))
    x = torch.ones(1, 3, 2, 2)
    assert torch.allclose(normalize(x, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]), torch.ones_like(x))
    assert interpolate(x, (4, 4)).shape == (1, 3, 4, 4) and interpolate(x[0], (1, 1)).shape == (3, 1, 1)
    summary = summarize_tensor(torch.tensor([1.0, 3.0]))
    assert "shape=(2,)" in summary and "min=1" in summary and "max=3" in summary and "mean=2" in summary
