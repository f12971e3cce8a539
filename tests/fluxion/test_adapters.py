"""Adapter API and LoRA: injection, exact ejection, composition, hand-computed LoRA math."""

import typing

import pytest
import torch

import fluxion.layers as fl
from fluxion.adapters import Adapter, Conv2dLora, LinearLora, Lora, LoraAdapter, SingleLoraAdapter


def model() -> fl.Chain:
    torch.manual_seed(0)
    return fl.Chain(fl.Linear(6, 6), fl.Chain(fl.Linear(6, 6), fl.SiLU()), fl.Linear(6, 3))


def randomize(adapter: LoraAdapter) -> None:
    for lora in adapter.iter_loras():
        torch.nn.init.normal_(lora.up.weight)


class Doubler(fl.Chain, Adapter[fl.Chain]):
    """An adapter of a whole Chain: `2 * target(x)`."""

    def __init__(self, target: fl.Chain) -> None:
        with self.setup_adapter(target):
            super().__init__(target, fl.Lambda(lambda x: x * 2))


def test_fresh_lora_changes_nothing_and_eject_restores_the_tree():
    net = model()
    x = torch.randn(4, 6)
    before, tree_before = net(x), repr(net)
    target = net.Chain.Linear
    adapter = SingleLoraAdapter(target, rank=2).inject(net.Chain)
    assert net.Chain.SingleLoraAdapter is adapter and adapter.target is target
    assert torch.equal(net(x), before)
    randomize(adapter)
    assert not torch.allclose(net(x), before)
    adapter.eject()
    assert net.Chain.Linear is target and repr(net) == tree_before
    assert torch.equal(net(x), before)


def test_lora_output_equals_hand_computation():
    linear = fl.Linear(5, 7)
    parent = fl.Chain(linear)
    adapter = SingleLoraAdapter(linear, rank=3, scale=0.7).inject(parent)
    randomize(adapter)
    down, up = adapter.lora.down.weight, adapter.lora.up.weight
    x = torch.randn(2, 5)
    expected = x @ linear.weight.T + linear.bias + 0.7 * (x @ down.T @ up.T)
    assert torch.allclose(parent(x), expected, atol=1e-6)
    assert torch.allclose(adapter.lora.delta_weight(), 0.7 * up @ down)


def test_conv_lora_output_equals_hand_computation():
    conv = fl.Conv2d(4, 6, 3, padding=1)
    parent = fl.Chain(conv)
    adapter = SingleLoraAdapter(conv, rank=2, scale=0.5).inject(parent)
    randomize(adapter)
    x = torch.randn(1, 4, 5, 5)
    lora = adapter.lora
    expected = conv(x) + 0.5 * torch.nn.functional.conv2d(
        torch.nn.functional.conv2d(x, lora.down.weight, padding=1), lora.up.weight
    )
    assert torch.allclose(parent(x), expected, atol=1e-5)
    fused = torch.nn.functional.conv2d(x, conv.weight + lora.delta_weight(), conv.bias, padding=1)
    assert torch.allclose(parent(x), fused, atol=1e-5)


def test_lora_adapter_holds_several_named_loras_with_their_own_scales():
    linear = fl.Linear(4, 4)
    parent = fl.Chain(linear)
    a, b = LinearLora("style", 4, 4, rank=2, scale=1.0), LinearLora("detail", 4, 4, rank=1, scale=0.25)
    adapter = LoraAdapter(linear, a, b).inject(parent)
    randomize(adapter)
    x = torch.randn(3, 4)
    assert torch.allclose(parent(x), linear(x) + a(x) + b(x), atol=1e-6)
    assert adapter.names == ["style", "detail"]
    b.scale = 0.0
    assert torch.allclose(parent(x), linear(x) + a(x), atol=1e-6)
    adapter.remove_lora("style")
    assert torch.allclose(parent(x), linear(x), atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        adapter.add_lora(LinearLora("wrong", 3, 4))
    with pytest.raises(ValueError, match="unique"):
        LoraAdapter(fl.Linear(4, 4), LinearLora("x", 4, 4), LinearLora("x", 4, 4))


@pytest.mark.parametrize("eject_first", ["outer", "inner"])
def test_two_adapters_on_one_layer_eject_in_either_order(eject_first):
    net = model()
    x = torch.randn(2, 6)
    before, tree_before = net(x), repr(net)
    target = net.Chain.Linear
    first = SingleLoraAdapter(target, rank=2, name="first").inject(net.Chain)
    second = SingleLoraAdapter(target, rank=2, name="second").inject(
        first
    )  # adapts the already-adapted layer
    randomize(first)
    randomize(second)
    both = net(x)
    assert not torch.allclose(both, before)
    (first if eject_first == "outer" else second).eject()
    (second if eject_first == "outer" else first).eject()
    assert net.Chain.Linear is target and repr(net) == tree_before
    assert torch.equal(net(x), before)


def test_an_adapter_may_wrap_another_adapter_and_ejection_order_does_not_matter():
    net = model()
    x = torch.randn(2, 6)
    before = net(x)
    target = net.Chain.Linear
    inner = SingleLoraAdapter(target, rank=2).inject(net.Chain)
    outer = SingleLoraAdapter(target, rank=2, name="outer")
    randomize(inner)
    randomize(outer)
    outer.inject(inner)
    inner.eject()  # the outer adapter now stands where the inner one was
    assert isinstance(net.Chain[0], SingleLoraAdapter) and net.Chain[0] is outer
    outer.eject()
    assert torch.equal(net(x), before)


def test_adapting_a_structural_copy_leaves_the_original_bit_identical():
    net = model()
    x = torch.randn(2, 6)
    before, tree_before = net(x), repr(net)
    copy = net.structural_copy()
    for linear, parent in list(copy.walk(fl.Linear)):
        randomize(SingleLoraAdapter(linear, rank=2).inject(parent))
    assert not torch.allclose(copy(x), before)
    assert torch.equal(net(x), before) and repr(net) == tree_before


def test_custom_adapter_on_a_chain_keeps_context_and_restores():
    block = fl.Chain(fl.Parallel(fl.Identity(), fl.UseContext("ctx", "bias")), fl.Lambda(lambda x, b: x + b))
    net = fl.Chain(block)
    net.set_context("ctx", {"bias": 1.0})
    x = torch.zeros(1)
    adapter = Doubler(block)
    assert torch.equal(net(x), x + 1)  # built, not injected: the model still works
    adapter.inject()
    assert torch.equal(net(x), (x + 1) * 2)
    adapter.eject()
    assert torch.equal(net(x), x + 1) and block.parent is net


def test_structural_copy_refuses_a_tree_holding_an_adapter_of_a_chain():
    net = model()
    adapter = Doubler(net.Chain).inject()
    with pytest.raises(RuntimeError, match=r"Chain adapters \(Doubler on a Chain\) .* eject them first"):
        net.structural_copy()
    with pytest.raises(RuntimeError, match="eject them first"):
        adapter.structural_copy()
    with pytest.raises(RuntimeError, match="eject them first"):
        net[0:2]  # slicing copies the children
    adapter.eject()
    assert net.structural_copy().Chain is not net.Chain


def test_structural_copy_of_a_lora_adapted_tree_shares_the_target_layer():
    net = model()
    target = net.Chain.Linear
    SingleLoraAdapter(target, rank=2).inject(net.Chain)
    copy = net.structural_copy()
    copied_adapter = copy.Chain.SingleLoraAdapter
    assert copied_adapter is not net.Chain.SingleLoraAdapter and copied_adapter.target is target
    copied_adapter.eject()
    assert copy.Chain.Linear is target and isinstance(net.Chain[0], SingleLoraAdapter)


def test_adapter_and_lora_are_generic_like_refiners_and_the_concrete_classes_are_not():
    def adapt(adapter: Adapter[fl.Linear], lora: Lora[fl.Conv2d]) -> None: ...

    hints = typing.get_type_hints(adapt)
    assert typing.get_origin(hints["adapter"]) is Adapter and typing.get_args(hints["adapter"]) == (
        fl.Linear,
    )
    assert typing.get_origin(hints["lora"]) is Lora and typing.get_args(hints["lora"]) == (fl.Conv2d,)
    assert Lora[fl.Linear] in LinearLora.__orig_bases__ and Lora[fl.Conv2d] in Conv2dLora.__orig_bases__
    for concrete in (LoraAdapter, SingleLoraAdapter, LinearLora, Conv2dLora):  # as in refiners
        with pytest.raises(TypeError, match="not a generic class"):
            concrete[fl.Linear]
    # Subscripting is for type checkers only: the classes and what they build are unchanged.
    adapter = SingleLoraAdapter(fl.Linear(2, 2), rank=1)
    assert isinstance(adapter, Adapter) and isinstance(adapter.lora, Lora) and isinstance(adapter, fl.Sum)


def test_inject_errors_are_clear():
    linear = fl.Linear(2, 2)
    adapter = SingleLoraAdapter(linear, rank=1)
    with pytest.raises(ValueError, match="pass the Chain"):
        adapter.inject()
    with pytest.raises(ValueError, match="not a child"):
        adapter.inject(fl.Chain(fl.Linear(2, 2)))
    with pytest.raises(ValueError, match="not injected"):
        adapter.eject()
    with pytest.raises(TypeError, match="Linear or Conv2d"):
        SingleLoraAdapter(fl.LayerNorm(2))
    with pytest.raises(ValueError, match="shape"):
        adapter.lora.load_weights(torch.zeros(2, 2), torch.zeros(2, 1))


def test_conv_lora_on_strided_conv():
    conv = fl.Conv2d(3, 3, 3, stride=2, padding=1)
    parent = fl.Chain(conv)
    adapter = SingleLoraAdapter(conv, rank=2).inject(parent)
    assert isinstance(adapter.lora, Conv2dLora)
    assert parent(torch.randn(1, 3, 8, 8)).shape == (1, 3, 4, 4)
