"""The tracing converter moves reference weights onto a Chain and reports divergences."""

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel

import fluxion.layers as fl
from fluxion.model_converter import ModelConversionError, convert_by_tracing


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
