"""Step previews: the predicted x0 through the host's previewer (ComfyUI's --preview-method), none headless."""

import sys
import types

import pytest
import torch

from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import SD15_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root / "models"


@pytest.fixture
def wires(monkeypatch, demo_models):
    monkeypatch.setattr(host, "_models_dir", demo_models)
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    positive = FluxionTextEncode().encode(clip, "a house")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    return model, positive, negative


class Recorder:
    """A progress reporter keeping what each step showed."""

    def __init__(self) -> None:
        self.total = 0
        self.previews: list = []

    def update_absolute(self, done: int, preview=None) -> None:
        self.previews.append(preview)


def _run(wires, progress, solver="euler", steps=4):
    model, positive, negative = wires
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    return sample_latents(model, positive, negative, latent, 3, steps, 4.0, solver, "normal", 1.0, progress)


def test_headless_shows_no_previews_unless_asked(wires):
    progress = Recorder()
    _run(wires, progress)
    assert progress.previews == [None] * 4


def test_asked_for_headless_previews_show_the_predicted_x0(wires, monkeypatch):
    monkeypatch.setattr(host, "_headless_preview_method", "latent2rgb")
    shown: list[torch.Tensor] = []
    original = host.latent_to_rgb
    monkeypatch.setattr(host, "latent_to_rgb", lambda x0, sdxl: shown.append(x0) or original(x0, sdxl))
    progress = Recorder()
    latents = _run(wires, progress)
    assert len(progress.previews) == 4 and all(image.size == (8, 8) for image in progress.previews)
    # Euler's last step lands on its prediction: the last preview's x0 is the result (measured 1.9e-6 apart).
    # Previews see the model's scaled latent, as ComfyUI's previewers do; the LATENT output is unscaled.
    scaled = latents * wires[0].model.autoencoder.scaling_factor
    assert torch.allclose(shown[-1], scaled, rtol=0, atol=1e-5), (shown[-1] - scaled).abs().max()
    assert not torch.allclose(shown[0], scaled, atol=0.1)  # the first is a rough guess (1.6 apart)


def test_hosted_previews_go_through_comfyuis_previewer(wires, monkeypatch):
    decoded = []

    class Previewer:
        def decode_latent_to_preview(self, x0):
            decoded.append(x0)
            return f"image {len(decoded)}"

    chosen = {"method": "auto"}
    latent_preview = types.ModuleType("latent_preview")
    latent_preview.get_previewer = lambda device, latent_format: (
        None if chosen["method"] == "none" else Previewer()
    )
    formats = types.ModuleType("comfy.latent_formats")
    formats.SD15 = lambda: "sd15 format"
    formats.SDXL = lambda: "sdxl format"
    comfy = types.ModuleType("comfy")
    comfy.latent_formats = formats
    mm = types.SimpleNamespace(get_torch_device=lambda: torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "latent_preview", latent_preview)
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.latent_formats", formats)
    monkeypatch.setattr(host, "_HOST", (mm, None, None))
    decode = host.preview_decoder(sdxl=False)
    monkeypatch.setattr(host, "_HOST", None)  # the run itself headless: only the decoder is ComfyUI's
    monkeypatch.setattr("nodes.previews.preview_decoder", lambda sdxl: decode)
    progress = Recorder()
    _run(wires, progress, steps=3)
    assert progress.previews == ["image 1", "image 2", "image 3"]
    assert all(x0.dtype == torch.float32 and x0.shape == (1, 4, 8, 8) for x0 in decoded)

    chosen["method"] = "none"  # --preview-method none: ComfyUI's get_previewer gives None
    monkeypatch.setattr(host, "_HOST", (mm, None, None))
    try:
        assert host.preview_decoder(sdxl=False) is None
    finally:
        monkeypatch.setattr(host, "_HOST", None)
