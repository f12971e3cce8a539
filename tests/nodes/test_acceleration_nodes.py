"""The acceleration nodes on the demo's tiny models: branch safety, exact restore, the settings reach the patches."""

from __future__ import annotations

import pytest
import torch

from nodes import host
from nodes.acceleration_nodes import FluxionCompile, FluxionDeepCache, FluxionTokenMerging
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import SD15_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionTextEncode

SIZE = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def models(demo_folders, monkeypatch, tmp_path):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    monkeypatch.setattr(host, "_input_dir", demo_folders / "input")
    monkeypatch.setattr(host, "_output_dir", tmp_path)
    return demo_folders


def sample(model, clip, latent, steps: int = 6):  # noqa: ANN001, ANN201
    positive = FluxionTextEncode().encode(clip, "a lighthouse", 1, **SIZE)[0]
    negative = FluxionTextEncode().encode(clip, "fog", 1, **SIZE)[0]
    return FluxionSampler().sample(model, positive, negative, latent, 3, steps, 6.0, "euler", "normal", 1.0)[
        0
    ]["samples"]


def test_branches_with_and_without_accelerations_get_their_solo_results(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    sd = model.model
    tree = repr(sd.unet)
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    deep = FluxionDeepCache().apply(model, 3, 1, 0.0, 1.0)[0]
    branches = {
        "plain": model,
        "deepcache": deep,
        "exact deepcache": FluxionDeepCache().apply(model, 1, 1, 0.0, 1.0)[0],
        "tome": FluxionTokenMerging().apply(model, 0.5, 0)[0],
        "both": FluxionTokenMerging().apply(deep, 0.5, 0)[0],
    }
    solo = {name: sample(wire, clip, latent) for name, wire in branches.items()}
    assert torch.equal(solo["exact deepcache"], solo["plain"])
    for name in ("deepcache", "tome", "both"):
        assert torch.isfinite(solo[name]).all() and (solo[name] - solo["plain"]).abs().max() > 1e-6, name
    for name in reversed(list(branches)):
        assert torch.equal(sample(branches[name], clip, latent), solo[name]), name
    assert model.patches == () and len(deep.patches) == 1 and repr(sd.unet) == tree


def test_compile_node_adds_its_patch_and_leaves_the_input_alone(models):
    model = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0]
    compiled = FluxionCompile().apply(model, "aot_eager", "default")[0]
    assert model.patches == () and "torch.compile (backend aot_eager)" in compiled.patches[-1].label


def test_bad_settings_name_the_problem(models):
    model = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0]
    with pytest.raises(ValueError, match="start_percent"):
        FluxionDeepCache().apply(model, 3, 1, 0.9, 0.1)
