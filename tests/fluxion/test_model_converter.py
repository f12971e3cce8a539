"""The tracing converter moves reference weights onto a Chain and reports divergences."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import fluxion.layers as fl
from fluxion.model_converter import ConversionStage, ModelConversionError, ModelConverter, convert_by_tracing
from fluxion.utils import load_from_safetensors


class TorchBlock(torch.nn.Module):
    """A hand-written pre-norm transformer block in plain torch."""

    def __init__(self, dim: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.fc1 = torch.nn.Linear(dim, 4 * dim)
        self.fc2 = torch.nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class TinyClipText(fl.Chain):
    """A CLIP text encoder written with fluxion layers (no final projection), for the converter test."""

    def __init__(self, vocab: int, dim: int, layers: int, heads: int, positions: int) -> None:
        super().__init__(
            fl.Sum(
                fl.Embedding(vocab, dim),
                fl.Chain(
                    fl.Lambda(lambda ids: torch.arange(ids.shape[1])[None]), fl.Embedding(positions, dim)
                ),
            ),
            *(
                fl.Chain(
                    fl.Residual(fl.LayerNorm(dim), fl.SelfAttention(dim, heads, is_causal=True)),
                    fl.Residual(
                        fl.LayerNorm(dim),
                        fl.Linear(dim, 4 * dim),
                        fl.ApproximateGeLU(),
                        fl.Linear(4 * dim, dim),
                    ),
                )
                for _ in range(layers)
            ),
            fl.LayerNorm(dim),
        )


def test_transfers_a_tiny_transformers_clip_text_model():
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=16,
        hidden_act="quick_gelu",
    )
    reference = CLIPTextModel(config).eval()
    ours = TinyClipText(100, 32, 2, 4, 16)
    ids = torch.randint(0, 100, (2, 16))
    report = convert_by_tracing(reference, ours, (ids,), check_tolerance=1e-6)
    assert report.max_abs_difference is not None and report.max_abs_difference <= 1e-6
    assert report.mapping["text_model.encoder.layers.0.self_attn.k_proj.weight"].endswith("Linear_2.weight")
    with torch.no_grad():
        expected = reference(ids).last_hidden_state
    assert (ours(ids) - expected).abs().max().item() <= 1e-6


def test_report_names_the_layers_where_models_diverge():
    reference = TinyClipText(50, 16, 1, 2, 8)
    wrong = TinyClipText(50, 16, 1, 2, 8)
    wrong.Chain.Residual_2.replace(wrong.Chain.Residual_2.Linear_1, fl.Linear(16, 32))
    wrong.Chain.Residual_2.replace(wrong.Chain.Residual_2.Linear_2, fl.Linear(32, 16))
    ids = torch.randint(0, 50, (1, 8))
    with pytest.raises(
        ModelConversionError,
        match=r"weighted layer #\d+ differs: source .*Linear_1.*\(64, 16\).* vs target .*\(32, 16\)",
    ):
        convert_by_tracing(reference, wrong, (ids,))
    shorter = TinyClipText(50, 16, 0, 2, 8)
    with pytest.raises(ModelConversionError, match="weighted layers"):
        convert_by_tracing(reference, shorter, (ids,))


def test_transfers_a_hand_written_torch_block_onto_a_chain():
    torch.manual_seed(0)
    source = TorchBlock().eval()
    target = fl.Chain(
        fl.Residual(fl.LayerNorm(16), fl.SelfAttention(16, 4)),
        fl.Residual(fl.LayerNorm(16), fl.Linear(16, 64), fl.GeLU(), fl.Linear(64, 16)),
    )
    # MultiheadAttention keeps q/k/v in one fused parameter: the tracer sees it as one layer with
    # (48, 16) weights, which has no single counterpart in the Chain, so the report says so.
    x = torch.randn(2, 5, 16)
    with pytest.raises(ModelConversionError, match="MultiheadAttention"):
        convert_by_tracing(source, target, (x,))


# -- ModelConverter (refiners' staged API) -----------------------------------------------------


class TorchClassifier(torch.nn.Module):
    """Imperative torch: a conv stem, a residual conv and a head whose twin layers are declared out of order."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.norm = torch.nn.GroupNorm(4, 16)
        self.res = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.head_mid = torch.nn.Linear(16, 16)  # declared first, runs second
        self.head_in = torch.nn.Linear(16, 16)
        self.head_out = torch.nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.norm(self.stem(x)))
        x = (x + self.res(x)).mean((2, 3))
        x = self.head_mid(torch.nn.functional.gelu(self.head_in(x)))
        return self.head_out(torch.relu(x))


def chain_classifier(
    activation: fl.Module | None = None,
    hidden: int = 16,
    with_norm: bool = True,
    last: fl.Module | None = None,
) -> fl.Chain:
    """The same computation declared as a Chain (optionally altered to make conversions fail)."""
    return fl.Chain(
        fl.Conv2d(3, 16, 3, padding=1),
        *([fl.GroupNorm(16, 4)] if with_norm else []),
        activation or fl.SiLU(),
        fl.Residual(fl.Conv2d(16, 16, 3, padding=1)),
        fl.Lambda(lambda x: x.mean((2, 3))),
        fl.Linear(16, hidden),
        fl.GeLU(),
        fl.Linear(hidden, 16),
        fl.ReLU(),
        fl.Linear(16, 10),
        *([last] if last is not None else []),
    )


def sample_image() -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_model_converter_converts_an_imperative_torch_model_into_an_equivalent_chain():
    torch.manual_seed(0)
    source, target = TorchClassifier().eval(), chain_classifier()
    x = sample_image()
    converter = ModelConverter(source, target, verbose=False)
    assert converter.stage == ConversionStage.INIT and not converter
    assert converter.run((x,))
    assert converter.stage == ConversionStage.MODELS_OUTPUT_AGREE and converter
    with torch.no_grad():
        assert torch.allclose(target(x), source(x), atol=1e-6, rtol=0)
    mapping = converter.get_mapping()
    # Twin layers pair by execution order, not by declaration order.
    assert mapping["Linear_1"] == "head_in" and mapping["Linear_2"] == "head_mid"
    assert mapping["Residual.Conv2d"] == "res" and mapping["GroupNorm"] == "norm"
    assert converter.run((x,)) and converter.stage == ConversionStage.MODELS_OUTPUT_AGREE  # done stays done


def test_model_converter_exports_the_converted_weights_only_once_done(tmp_path):
    torch.manual_seed(0)
    source, target = TorchClassifier().eval(), chain_classifier()
    converter = ModelConverter(source, target, verbose=False)
    with pytest.raises(ValueError, match="not done"):
        converter.get_state_dict()
    with pytest.raises(ValueError, match="not done"):
        converter.save_to_safetensors(tmp_path / "early.safetensors")
    assert converter.run((sample_image(),))
    converter.save_to_safetensors(tmp_path / "half.safetensors", metadata={"source": "torch"}, half=True)
    saved = load_from_safetensors(tmp_path / "half.safetensors")
    assert set(saved) == set(target.state_dict()) and all(
        value.dtype == torch.float16 for value in saved.values()
    )
    fresh = chain_classifier()
    fresh.load_state_dict(converter.get_state_dict())
    assert torch.equal(fresh.Linear_3.weight, source.head_out.weight)


def test_model_converter_stops_at_basic_layers_match_on_a_shape_mismatch():
    torch.manual_seed(0)
    source, target = TorchClassifier().eval(), chain_classifier(hidden=12)
    untouched = target.Linear_3.weight.clone()
    converter = ModelConverter(source, target, verbose=False)
    assert not converter.run((sample_image(),))
    assert converter.stage == ConversionStage.BASIC_LAYERS_MATCH  # same layer types, not the same shapes
    report = "\n".join(converter.messages)
    assert (
        "Linear with parameters [(16, 16), (16,)] runs 2 time(s) in the source ['head_in', 'head_mid']"
        in report
    )
    assert "conversion stopped at stage BASIC_LAYERS_MATCH" in report
    assert torch.equal(target.Linear_3.weight, untouched)  # nothing was loaded
    with pytest.raises(ValueError, match="stage BASIC_LAYERS_MATCH"):
        converter.get_mapping()


def test_model_converter_stops_at_init_when_the_basic_layers_differ():
    torch.manual_seed(0)
    source, target = TorchClassifier().eval(), chain_classifier(with_norm=False)
    converter = ModelConverter(source, target, verbose=False)
    assert not converter.run((sample_image(),))
    assert converter.stage == ConversionStage.INIT
    assert "GroupNorm: source 1, target 0" in "\n".join(converter.messages)
    skipping = ModelConverter(source, target, skip_init_check=True, verbose=False)
    assert not skipping.run((sample_image(),))  # the next check still sees a GroupNorm with no counterpart
    assert skipping.stage == ConversionStage.BASIC_LAYERS_MATCH


def test_model_converter_stops_at_shape_and_layers_match_when_outputs_disagree():
    torch.manual_seed(0)
    source, x = TorchClassifier().eval(), sample_image()
    wrong_activation = ModelConverter(source, chain_classifier(activation=fl.ReLU()), verbose=False)
    assert not wrong_activation.run((x,))
    assert wrong_activation.stage == ConversionStage.SHAPE_AND_LAYERS_MATCH  # weights were copied
    assert "models diverge between norm and res in the source" in "\n".join(wrong_activation.messages)
    # Every basic layer agrees but a layer after the last one changes the output: still caught.
    scaled_output = ModelConverter(source, chain_classifier(last=fl.Multiply(2.0)), verbose=False)
    assert not scaled_output.run((x,))
    assert "final outputs differ" in "\n".join(scaled_output.messages)
    unchecked = ModelConverter(
        source, chain_classifier(activation=fl.ReLU()), skip_output_check=True, verbose=False
    )
    assert unchecked.run((x,)) and unchecked.stage == ConversionStage.SHAPE_AND_LAYERS_MATCH
    assert unchecked.get_mapping()["Linear_3"] == "head_out"


class TorchChannelScale(torch.nn.Module):
    """A weighted layer that is none of torch's basic layers."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.randn(channels))

    def forward(self, x: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        return x * self.gain + shift


class ChannelScale(fl.WeightedModule):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = torch.nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def test_model_converter_pairs_custom_layers_and_takes_keyword_arguments():
    torch.manual_seed(0)
    source, target = TorchChannelScale(4), fl.Chain(ChannelScale(4))
    x = torch.randn(3, 4)
    source_args = {"positional": (x,), "keyword": {"shift": 0.0}}
    plain = ModelConverter(source, target, verbose=False)
    assert not plain.run(source_args, (x,)) and plain.stage == ConversionStage.INIT
    assert "not basic layers" in plain.messages[0] and "TorchChannelScale" in plain.messages[0]
    mapped = ModelConverter(
        source, target, custom_layer_mapping={TorchChannelScale: ChannelScale}, verbose=False
    )
    assert mapped.run(source_args, (x,))
    assert mapped.get_mapping() == {"ChannelScale": ""} and torch.equal(target.ChannelScale.gain, source.gain)
    assert torch.allclose(target(x), source(x))
