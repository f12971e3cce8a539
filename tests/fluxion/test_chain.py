"""Chain behaviour: naming, access, walking, editing, copying, contexts and located errors."""

import pytest
import torch

import fluxion.layers as fl


def small_mlp() -> fl.Chain:
    return fl.Chain(fl.Linear(4, 8), fl.SiLU(), fl.Linear(8, 4))


def test_children_are_named_by_class_and_reachable_by_attribute_index_and_slice():
    chain = small_mlp()
    assert list(chain._modules) == ["Linear_1", "SiLU", "Linear_2"]
    assert chain.Linear_1 is chain[0] and chain.SiLU is chain["SiLU"] and chain[-1] is chain.Linear_2
    head = chain[0:2]
    assert isinstance(head, fl.Chain) and len(head) == 2 and head[0] is chain.Linear_1
    x = torch.randn(3, 4)
    assert torch.equal(head(x), torch.nn.functional.silu(chain.Linear_1(x)))


def test_assigning_a_child_by_attribute_is_refused():
    chain = small_mlp()
    with pytest.raises(ValueError, match="children are ordered"):
        chain.extra = fl.Linear(2, 2)


def test_composition_layers_compute_what_they_say():
    x = torch.randn(2, 4)
    a, b = fl.Linear(4, 4), fl.Linear(4, 4)
    assert torch.allclose(fl.Sum(a, b)(x), a(x) + b(x))
    assert torch.allclose(fl.Residual(a)(x), a(x) + x)
    assert all(torch.equal(u, v) for u, v in zip(fl.Parallel(a, b)(x), (a(x), b(x))))
    y = torch.randn(2, 4)
    assert all(torch.equal(u, v) for u, v in zip(fl.Distribute(a, b)(x, y), (a(x), b(y))))
    assert torch.equal(fl.Concatenate(a, b, dim=1)(x), torch.cat([a(x), b(x)], dim=1))
    assert torch.allclose(fl.Matmul(fl.Identity(), fl.Transpose(0, 1))(x), x @ x.T)
    assert torch.equal(fl.Passthrough(a)(x), x)
    assert torch.equal(fl.Chain(a, fl.Return(), b)(x), a(x))
    assert torch.equal(fl.Lambda(lambda t: t * 3)(x), x * 3)


def test_shape_layers():
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert fl.Reshape(4, 3)(x).shape == (2, 4, 3)
    assert fl.Flatten(1)(x).shape == (2, 12)
    assert fl.Unflatten(2, (2, 2))(x).shape == (2, 3, 2, 2)
    assert fl.Permute(2, 0, 1)(x).shape == (4, 2, 3)
    assert fl.Unsqueeze(0)(x).shape == (1, 2, 3, 4) and fl.Squeeze(0)(x[None]).shape == x.shape
    assert torch.equal(fl.Slicing(dim=-1, start=1, end=3)(x), x[..., 1:3])
    assert torch.equal(fl.Slicing(dim=1, start=0, step=2)(x), x[:, ::2])
    assert [t.shape for t in fl.Chunk(2, dim=-1)(x)] == [(2, 3, 2), (2, 3, 2)]
    assert len(fl.Unbind(1)(x)) == 3
    assert fl.Pad((1, 1))(x).shape == (2, 3, 6)


def test_walk_layers_find_and_find_parent():
    inner = fl.Chain(fl.Linear(2, 2), fl.ReLU())
    outer = fl.Chain(fl.Linear(2, 2), fl.Residual(inner))
    linears = list(outer.walk(fl.Linear))
    assert [parent for _, parent in linears] == [outer, inner]
    assert len(list(outer.layers(fl.Chain))) == 1  # the Residual matches, so it is not descended into
    assert len(list(outer.layers(fl.Chain, recurse=True))) == 2
    assert outer.find(fl.ReLU) is inner.ReLU
    assert outer.find_parent(inner.ReLU) is inner
    with pytest.raises(ValueError, match="no GroupNorm"):
        outer.ensure_find(fl.GroupNorm)
    # a matched Chain is not descended into unless recurse=True
    assert len(list(outer.walk(fl.Chain))) == 1
    assert len(list(outer.walk(fl.Chain, recurse=True))) == 2
    assert len(list(outer.walk(lambda module, parent: isinstance(module, fl.ReLU)))) == 1


def test_walk_stops_when_the_predicate_raises_stop_iteration():
    pruned = fl.Parallel(fl.Linear(3, 3), fl.Chain(fl.Linear(3, 3)))
    kept = fl.Chain(fl.Linear(3, 3), fl.Chain(fl.Linear(3, 3)))
    tree = fl.Chain(fl.Linear(3, 3), pruned, kept)

    def linears_outside_parallels(module: fl.Module, parent: fl.Chain) -> bool:
        if isinstance(module, fl.Parallel):
            raise StopIteration  # as in refiners: skip this subtree, go on with its siblings
        return isinstance(module, fl.Linear)

    found = [module for module, _ in tree.walk(linears_outside_parallels)]
    assert found == [tree.Linear, kept.Linear, kept.Chain.Linear]
    assert [module for module, _ in tree.walk(linears_outside_parallels, recurse=True)] == found
    assert len(list(tree.layers(fl.Linear))) == 5  # a type predicate never prunes


def test_walk_prunes_only_the_subtree_where_a_nested_predicate_raises_stop_iteration():
    deep = fl.Chain(fl.ReLU(), fl.Linear(2, 2))
    tree = fl.Chain(fl.Chain(deep, fl.Linear(2, 2)), fl.Linear(2, 2))

    def stop_at_relu_chains(module: fl.Module, parent: fl.Chain) -> bool:
        if isinstance(module, fl.Chain) and any(isinstance(child, fl.ReLU) for child in module):
            raise StopIteration
        return isinstance(module, fl.Linear)

    assert [module for module, _ in tree.walk(stop_at_relu_chains)] == [tree.Chain.Linear, tree.Linear]


def test_editing_keeps_names_consistent():
    chain = small_mlp()
    chain.append(fl.Sigmoid())
    chain.insert(0, fl.Identity())
    chain.insert_before_type(fl.SiLU, fl.ReLU())
    chain.insert_after_type(fl.SiLU, fl.GeLU())
    assert [type(m).__name__ for m in chain] == [
        "Identity",
        "Linear",
        "ReLU",
        "SiLU",
        "GeLU",
        "Linear",
        "Sigmoid",
    ]
    popped = chain.pop()
    assert isinstance(popped, fl.Sigmoid)
    chain.remove(chain.Identity)
    new = fl.Linear(8, 4)
    chain.replace(chain.Linear_2, new)
    assert chain.Linear_2 is new
    with pytest.raises(ValueError, match="not a child"):
        chain.remove(fl.ReLU())


def test_structural_copy_shares_weights_but_not_structure():
    chain = fl.Chain(fl.Linear(4, 4), fl.Chain(fl.Linear(4, 4)))
    copy = chain.structural_copy()
    assert copy is not chain and copy.Chain is not chain.Chain
    assert copy.Linear is chain.Linear  # leaves (and weights) are shared
    copy.Chain.append(fl.ReLU())
    assert len(chain.Chain) == 1


def test_context_api_set_use_and_init_context():
    class Scaled(fl.Chain):
        def init_context(self):
            return {"scaling": {"factor": 2.0}}

    chain = fl.Chain(
        Scaled(fl.Parallel(fl.Identity(), fl.UseContext("scaling", "factor")), fl.Lambda(lambda x, f: x * f))
    )
    x = torch.ones(1, 2)
    assert torch.equal(chain(x), 2 * x)
    chain.set_context("scaling", {"factor": 5.0})
    assert torch.equal(chain(x), 5 * x)
    assert chain.use_context("scaling")["factor"] == 5.0
    chain.Scaled.set_context("scaling", {"factor": 3.0})  # any chain writes to its tree's store
    assert torch.equal(chain(x), 3 * x)
    store = fl.Chain(fl.SetContext("memo", "value"), fl.Lambda(lambda x: x + 1))
    store.set_context("memo", {})
    store(x)
    assert torch.equal(store.use_context("memo")["value"], x)


def test_missing_context_is_a_clear_error():
    chain = fl.Chain(fl.UseContext("cross_attention", "embedding"))
    with pytest.raises(fl.ChainError, match="context 'cross_attention' is not set"):
        chain(torch.ones(1))


def test_failure_deep_in_a_tree_names_place_state_key_and_inputs():
    class Encoder(fl.Chain):
        pass

    model = Encoder(
        fl.Linear(4, 4),
        fl.Chain(fl.Residual(fl.Linear(4, 4), fl.Linear(5, 4))),  # the second Linear expects 5 features
    )
    with pytest.raises(fl.ChainError) as error:
        model(torch.full((2, 4), 0.5))
    message = str(error.value)
    assert "Encoder.Chain.Residual.Linear_2" in message
    assert "state-dict key 'Chain.Residual.Linear_2'" in message
    assert "shape=(2, 4)" in message and "dtype=torch.float32" in message and "mean=" in message
    assert ">> Linear_2" in message
    assert isinstance(error.value.__cause__, RuntimeError)
    assert "Chain.Residual.Linear_2.weight" in model.state_dict()


def test_repr_collapses_repeated_blocks_and_shows_shapes():
    chain = fl.Chain(*(fl.Chain(fl.Linear(3, 3), fl.ReLU()) for _ in range(5)), fl.Linear(3, 1))
    text = repr(chain)
    assert "(x5) (CHAIN) Chain()" in text
    assert "weight=(3, 3)" in text and "in_features=3, out_features=1" in text
    assert text.count("ReLU") == 1


def test_converter_moves_inputs_to_the_parent_dtype():
    chain = fl.Chain(fl.Converter(), fl.Linear(2, 2, dtype=torch.float64))
    assert chain(torch.ones(1, 2, dtype=torch.float32)).dtype == torch.float64


def test_converter_without_a_parent_raises_refiners_assertion_error():
    with pytest.raises(AssertionError, match="does not have a parent"):
        fl.Converter()(torch.ones(1, 2))


def test_converter_whose_parent_has_no_device_or_dtype_raises_refiners_assertion_error():
    x = torch.ones(1, 2)
    weightless = fl.Chain(fl.Converter(), fl.ReLU())
    with pytest.raises(AssertionError, match="parent has no device"):
        weightless.Converter(x)
    with pytest.raises(
        fl.ChainError, match="parent has no device"
    ) as caught:  # located, like any layer error
        weightless(x)
    assert isinstance(caught.value.__cause__, AssertionError)
    dtype_only = fl.Chain(fl.Converter(set_device=False), fl.ReLU())
    with pytest.raises(AssertionError, match="parent has no dtype"):
        dtype_only.Converter(x)
    nothing_to_convert = fl.Chain(fl.Converter(set_device=False, set_dtype=False), fl.ReLU())
    assert torch.equal(nothing_to_convert(x), x)


def test_sampling_layers_roundtrip_odd_sizes():
    chain = fl.Chain(fl.Downsample(4, scale_factor=2), fl.Upsample(4))
    x = torch.randn(1, 4, 7, 9)
    assert chain(x).shape == x.shape
    assert fl.Upsample(4, upsample_factor=2)(torch.randn(1, 4, 3, 3)).shape == (1, 4, 6, 6)
    assert fl.Downsample(4, padding=0, register_shape=False)(torch.randn(1, 4, 8, 8)).shape == (1, 4, 4, 4)


def test_every_weighted_layer_takes_device_and_dtype():
    for layer in (
        fl.Linear(2, 2, dtype=torch.float64),
        fl.Conv2d(2, 2, 3, dtype=torch.float64),
        fl.ConvTranspose2d(2, 2, 3, dtype=torch.float64),
        fl.LayerNorm(2, dtype=torch.float64),
        fl.LayerNorm2d(2, dtype=torch.float64),
        fl.GroupNorm(2, 1, dtype=torch.float64),
        fl.Embedding(3, 2, dtype=torch.float64),
        fl.Parameter(2, 2, dtype=torch.float64),
        fl.Attention(4, 2, dtype=torch.float64),
        fl.MultiLinear(2, 2, 4, 3, dtype=torch.float64),
    ):
        assert all(p.dtype == torch.float64 for p in layer.parameters()), type(layer).__name__
    assert fl.Linear(2, 2, device="meta").weight.is_meta


def test_activations():
    x = torch.linspace(-3, 3, 11)
    assert torch.allclose(fl.GeLU()(x), torch.nn.functional.gelu(x))
    assert torch.allclose(fl.GeLU("tanh")(x), torch.nn.functional.gelu(x, approximate="tanh"))
    assert torch.allclose(fl.ApproximateGeLU()(x), x * torch.sigmoid(1.702 * x))
    value, gate = torch.randn(2, 5), torch.randn(2, 5)
    assert torch.allclose(
        fl.GLU(fl.GeLU())(torch.cat([value, gate], -1)), value * torch.nn.functional.gelu(gate), atol=1e-6
    )
    assert torch.equal(fl.SiLU()(x), torch.nn.functional.silu(x)) and torch.equal(fl.ReLU()(x), x.relu())
    with pytest.raises(ValueError):
        fl.GeLU("erf")


def test_layer_norm_2d_matches_layer_norm_over_channels():
    x = torch.randn(2, 6, 3, 3)
    layer = fl.LayerNorm2d(6)
    reference = torch.nn.functional.layer_norm(x.permute(0, 2, 3, 1), (6,), eps=1e-6).permute(0, 3, 1, 2)
    assert torch.allclose(layer(x), reference, atol=1e-6)
