"""fluxion.casting: weights stored in one dtype, computed in another, stored weights untouched."""

import pytest
import torch

from fluxion import layers as fl
from fluxion.casting import (
    compute_dtype,
    compute_in,
    compute_placement,
    cover_new_layers,
    is_streamed,
    set_stream_device,
    stream_weights,
)


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


def test_float8_storage_computes_like_the_float32_model_of_its_rounded_weights():
    stored = _model(torch.float32).to(dtype=torch.float8_e4m3fn)  # ComfyUI's --fp8_e4m3fn-unet storage
    rounded = _model(torch.float32).to(dtype=torch.float8_e4m3fn).to(dtype=torch.float32)  # exact upcast
    compute_in(stored, torch.float32)
    x = torch.randn(3, 8)
    assert torch.equal(stored(x), rounded(x))  # same float32 operations on the same values
    assert {p.dtype for p in stored.parameters()} == {torch.float8_e4m3fn}
    assert compute_placement(stored) == (torch.device("cpu"), torch.float32)
    assert stored.dtype == torch.float32 and stored[0].dtype == torch.float32  # what callers cast inputs to


def test_a_streamed_layer_brings_its_weights_and_the_hosts_weight_functions_for_each_call():
    layer = fl.Linear(8, 4)
    plain = fl.Linear(8, 4)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8)
    assert hasattr(layer, "comfy_cast_weights") and layer.comfy_cast_weights is False
    layer.comfy_cast_weights = True  # what ComfyUI's ModelPatcher does to a layer it leaves offloaded
    assert is_streamed(layer) and torch.equal(layer(x), plain(x))
    stored = layer.weight
    layer.weight_function = [lambda weight: weight.mul_(2)]  # the host patches the streamed copy (in place)
    layer.bias_function = [lambda bias: bias + 1]
    with torch.no_grad():
        expected = torch.nn.functional.linear(x, plain.weight * 2, plain.bias + 1)
    assert torch.equal(layer(x), expected)
    assert layer.weight is stored and torch.equal(stored, plain.weight)  # the stored weights never change
    layer.comfy_cast_weights = False  # loaded back: plain forward, no hooks left
    assert not is_streamed(layer) and not layer._forward_pre_hooks and not layer._forward_hooks
    assert torch.equal(layer(x), plain(x))


def test_streamed_layers_report_the_compute_device_set_for_them_and_compose_with_a_compute_dtype():
    model = _model(torch.float16)
    reference = _model(torch.float16).to(dtype=torch.float32)
    compute_in(model, torch.float32)
    for layer in (model[0], model[3]):
        stream_weights(layer, True)
    assert set_stream_device(model, torch.device("cpu")) == 2
    assert compute_placement(model) == (torch.device("cpu"), torch.float32)
    x = torch.randn(2, 8)
    assert torch.equal(model(x), reference(x))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 7))
    assert all(p.dtype == torch.float16 for p in model.parameters())  # restored after the failed call
    compute_in(model, None)  # the dtype goes, the streaming stays until the host turns it off
    assert is_streamed(model[0]) and model(x.half()).dtype == torch.float16


def test_layers_a_host_left_elsewhere_unannounced_are_streamed_until_they_arrive():
    model = fl.Chain(fl.Linear(8, 8), fl.Linear(8, 4))
    model[1].to_empty(device="meta")  # a layer the host did not move (it has no say in the matter)
    assert set_stream_device(model, torch.device("cpu")) == 1
    assert is_streamed(model[1]) and not is_streamed(model[0])
    model[1].to_empty(device="cpu")  # loaded at last
    assert set_stream_device(model, torch.device("cpu")) == 0 and not is_streamed(model[1])


def test_only_layers_with_a_weight_and_a_bias_offer_the_hosts_switch():
    assert all(hasattr(layer, "comfy_cast_weights") for layer in (fl.Embedding(4, 2), fl.Parameter(3)))
    assert fl.Embedding(4, 2).bias is None  # what ComfyUI reads of every layer it may stream
