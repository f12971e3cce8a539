"""The seed's three key-concept snippets run with only `refiners.fluxion` replaced by `fluxion`."""

import runpy
import subprocess
import sys
from pathlib import Path

import torch

import fluxion.layers as fl
from fluxion.adapters.lora import SingleLoraAdapter

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "library"


def load_example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_vit_chain_snippet_builds_and_runs():
    ViT = load_example("seed_vit_chain.py")["ViT"]
    vit = ViT(embedding_dim=64, image_size=64, num_heads=4, num_layers=2)
    y = vit(torch.randn(2, 3, 64, 64))
    assert y.shape == (2, 64, 4, 4)
    assert len(list(vit.layers(fl.Attention))) == 2
    assert "(x2) (CHAIN) Chain()" in repr(vit)


def test_cross_attention_snippet_reads_the_context():
    ViT = load_example("seed_cross_attention_context.py")["ViT"]
    vit = ViT(embedding_dim=32, image_size=32, num_heads=4, num_layers=2)
    x = torch.randn(2, 3, 32, 32)
    vit.set_context("cross_attention", {"my_embed": torch.randn(2, 7, 32)})
    first = vit(x)
    vit.set_context("cross_attention", {"my_embed": torch.randn(2, 7, 32)})
    second = vit(x)
    assert first.shape == (2, 32, 2, 2)
    assert not torch.allclose(first, second), "the output must depend on the context value"


def test_lora_snippet_injects_in_every_attention_linear():
    ViT = load_example("seed_vit_chain.py")["ViT"]
    vit = ViT(embedding_dim=32, image_size=32, num_heads=4, num_layers=3)
    x = torch.randn(2, 3, 32, 32)
    before = vit(x)
    for layer in vit.layers(fl.Attention):
        for linear, parent in layer.walk(fl.Linear):
            SingleLoraAdapter(target=linear, rank=64).inject(parent)
    assert len(list(vit.layers(SingleLoraAdapter))) == 3 * 4
    assert torch.equal(vit(x), before)


def test_example_scripts_run_as_scripts(tmp_path):
    for script in ("seed_cross_attention_context.py", "seed_lora_injection.py"):
        result = subprocess.run(
            [sys.executable, str(EXAMPLES / script)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert "output" in result.stdout
    assert "unchanged by fresh LoRAs: True" in result.stdout
