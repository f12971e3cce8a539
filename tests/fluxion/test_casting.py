"""fluxion.casting: weights stored in one dtype, computed in another, stored weights untouched."""

import pytest
import torch

from fluxion import layers as fl
from fluxion.casting import compute_dtype, compute_in, cover_new_layers


def _model(dtype: torch.dtype) -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(fl.Linear(8, 16), fl.LayerNorm(16), fl.SiLU(), fl.Linear(16, 4)).to(dtype=dtype)


def test_a_float16_model_computes_in_float32_as_its_float32_copy_and_keeps_its_weights():
    stored = _model(torch.float16)
    upcast = _model(torch.float16).to(dtype=torch.float32)  # the same weights, made float32 for good
    before = {name: tensor for name, tensor in stored.state_dict(keep_vars=True).items()}
    compute_in(stored, torch.float32)
    x = torch.randn(2, 8)
    output = stored(x)
    assert output.dtype == torch.float32 and compute_dtype(stored) == torch.float32
    assert torch.equal(output, upcast(x))  # the same operations on the same float32 tensors
    after = stored.state_dict(keep_vars=True)
    assert all(after[name] is tensor and tensor.dtype == torch.float16 for name, tensor in before.items())
    assert stored(x.half()).dtype == torch.float32  # inputs are cast too


def test_weights_are_back_when_a_forward_raises():
    model = _model(torch.float16)
    compute_in(model, torch.float32)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7))  # wrong width: the first Linear raises inside its forward
    assert all(p.dtype == torch.float16 for p in model.parameters())
    assert model(torch.randn(2, 8)).dtype == torch.float32


def test_layers_added_later_compute_in_the_dtype_too_and_none_undoes_it():
    model = _model(torch.float16)
    compute_in(model, torch.float32)
    model.append(fl.Linear(4, 2).to(dtype=torch.float16))
    view = fl.Chain(*[child.structural_copy() for child in model])  # runs the layers, not the root
    cover_new_layers(model)
    assert view(torch.randn(1, 8)).dtype == torch.float32
    compute_in(model, None)
    assert compute_dtype(model) is None
    assert model(torch.randn(1, 8, dtype=torch.float16)).dtype == torch.float16
