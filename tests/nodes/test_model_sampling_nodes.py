"""Fluxion Model Sampling (Discrete): a new model wire sampled as v-prediction / zero terminal SNR, branch-safe."""

import pytest
import torch

from foundationals.latent_diffusion.solvers import PredictionType
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import DEMO_LORA, SD15_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent, FluxionVAEDecode
from nodes.lora_nodes import FluxionLoraLoader
from nodes.model_sampling_nodes import FluxionModelSamplingDiscrete
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionTextEncode

SIZE = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def loaded(demo_folders, monkeypatch):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    monkeypatch.setattr(host, "_input_dir", demo_folders / "input")
    return FluxionCheckpointLoader().load(SD15_CHECKPOINT)


def encode(clip, text):
    return FluxionTextEncode().encode(clip, text, 1, **SIZE)[0]


def sample(model, positive, negative, latent, solver="euler", schedule="trailing"):
    return FluxionSampler().sample(model, positive, negative, latent, 5, 4, 6.0, solver, schedule, 1.0)[0]


def test_the_override_returns_a_new_wire_and_leaves_its_input_alone(loaded):
    model, _, _ = loaded
    (v_model,) = FluxionModelSamplingDiscrete().patch(model, "v_prediction", True)
    assert (v_model.model.prediction_type, v_model.model.zero_terminal_snr) == (
        PredictionType.V_PREDICTION,
        True,
    )
    assert (model.model.prediction_type, model.model.zero_terminal_snr) == (PredictionType.EPSILON, False)
    assert v_model.model.unet is model.model.unet and v_model.name == model.name and v_model.patches == ()
    (x0,) = FluxionModelSamplingDiscrete().patch(v_model, "x0", False)
    assert (x0.model.prediction_type, x0.model.zero_terminal_snr) == (PredictionType.SAMPLE, False)
    with pytest.raises(ValueError, match="sampling 'lcm' is none of eps, v_prediction, x0"):
        FluxionModelSamplingDiscrete().patch(model, "lcm", False)


def test_the_sampler_uses_the_override_and_branches_keep_their_own(loaded):
    model, clip, vae = loaded
    positive, negative = encode(clip, "a lighthouse"), encode(clip, "")
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    (v_model,) = FluxionModelSamplingDiscrete().patch(model, "v_prediction", True)
    plain = sample(model, positive, negative, latent)["samples"]
    v_prediction = sample(v_model, positive, negative, latent)["samples"]
    assert not torch.equal(plain, v_prediction)
    assert torch.equal(
        sample(model, positive, negative, latent)["samples"], plain
    )  # the input still samples as eps
    image = FluxionVAEDecode().decode(vae, {"samples": v_prediction}, False)[0]
    library = v_model.model.text_to_image(
        "a lighthouse",
        "",
        width=64,
        height=64,
        steps=4,
        guidance_scale=6.0,
        seed=5,
        solver="euler",
        schedule="trailing",
    )
    assert torch.equal(image, library.permute(0, 2, 3, 1))


def test_the_override_keeps_the_adapter_stack_either_side_of_it(loaded):
    model, clip, _ = loaded
    positive, negative = encode(clip, "a boat"), encode(clip, "")
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    with_lora = FluxionLoraLoader().load(model, clip, DEMO_LORA, 1.0, 1.0, True)[0]
    lora_then_v = FluxionModelSamplingDiscrete().patch(with_lora, "v_prediction", False)[0]
    v_then_lora = FluxionLoraLoader().load(
        FluxionModelSamplingDiscrete().patch(model, "v_prediction", False)[0], clip, DEMO_LORA, 1.0, 1.0, True
    )[0]
    assert lora_then_v.patches == with_lora.patches and len(v_then_lora.patches) == 1
    first = sample(lora_then_v, positive, negative, latent, "dpmpp_2m", "karras")["samples"]
    assert torch.equal(
        first, sample(v_then_lora, positive, negative, latent, "dpmpp_2m", "karras")["samples"]
    )
    assert not torch.equal(
        first, sample(with_lora, positive, negative, latent, "dpmpp_2m", "karras")["samples"]
    )
