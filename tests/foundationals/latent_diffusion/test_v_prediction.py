"""v-prediction and zero-terminal-SNR models: read from the files, carried on the model, sampled as diffusers does.

The whole-pipeline tests run diffusers' StableDiffusionPipeline with a v-prediction, rescale_betas_zero_snr
scheduler (trailing spacing, as the zero-terminal-SNR paper recommends) and ours on the same tiny random
weights. Measured max abs difference on the [0, 1] images (torch 2.13 CPU, fp32): 1.7e-5 to 2.2e-5 (trailing
spacing starts at t = 999, where this tiny UNet is most sensitive: epsilon DDIM there differs by 7e-6 too).
Tolerance 1e-4, as in test_stable_diffusion_pipeline.py.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from safetensors import safe_open

from foundationals.latent_diffusion.checkpoint import CheckpointError, load_checkpoint
from foundationals.latent_diffusion.checkpoint_export import save_single_file, single_file_state_dict
from foundationals.latent_diffusion.model_config import UNET_PRESETS
from foundationals.latent_diffusion.solvers import PredictionType
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from tests.foundationals.latent_diffusion.test_checkpoint_loading import diffusers_unet, meta_ldm_file
from tests.support.parity import assert_parity
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    ours_from_diffusers,
    transformers_text_encoder,
)
from tests.support.tiny_sd import diffusers_unet as tiny_diffusers_unet

V = PredictionType.V_PREDICTION
EMPTY = torch.tensor([])


@pytest.mark.parametrize("preset", ["tiny", "tiny_sdxl"])
@pytest.mark.parametrize(
    ("markers", "expected"),
    [
        ({}, (PredictionType.EPSILON, False)),
        ({"v_pred": EMPTY}, (V, False)),
        ({"v_pred": EMPTY, "ztsnr": EMPTY}, (V, True)),
        ({"ztsnr": EMPTY}, (PredictionType.EPSILON, True)),
    ],
    ids=["none", "v_pred", "v_pred+ztsnr", "ztsnr"],
)
def test_single_file_marker_keys_say_how_to_sample(tmp_path, preset, markers, expected):
    """ComfyUI's marker keys (empty tensors) are read, not refused as keys of no known part."""
    path = meta_ldm_file(tmp_path / "model.safetensors", UNET_PRESETS[preset], markers)
    checkpoint = load_checkpoint(path, text_encoders=False)
    assert (checkpoint.prediction_type, checkpoint.zero_terminal_snr) == expected


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (dict(prediction_type="v_prediction", rescale_betas_zero_snr=True), (V, True)),
        (dict(prediction_type="v_prediction"), (V, False)),
        (dict(prediction_type="sample"), (PredictionType.SAMPLE, False)),
        ({}, (PredictionType.EPSILON, False)),
    ],
)
def test_diffusers_folder_scheduler_config_says_how_to_sample(tmp_path, config, expected):
    diffusers_unet(UNET_PRESETS["tiny"]).save_pretrained(tmp_path / "unet")
    DDIMScheduler(beta_schedule="scaled_linear", **config).save_pretrained(tmp_path / "scheduler")
    checkpoint = load_checkpoint(tmp_path, text_encoders=False)
    assert (checkpoint.prediction_type, checkpoint.zero_terminal_snr) == expected


def test_a_folder_without_scheduler_config_is_epsilon_and_a_bad_one_is_named(tmp_path):
    diffusers_unet(UNET_PRESETS["tiny"]).save_pretrained(tmp_path / "unet")
    checkpoint = load_checkpoint(tmp_path, text_encoders=False)
    assert (checkpoint.prediction_type, checkpoint.zero_terminal_snr) == (PredictionType.EPSILON, False)
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "flow"}')
    with pytest.raises(
        CheckpointError, match=r"scheduler_config\.json: prediction_type 'flow' is none of epsilon"
    ):
        load_checkpoint(tmp_path, text_encoders=False)
    (tmp_path / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"scheduler_config\.json: not valid JSON"):
        load_checkpoint(tmp_path, text_encoders=False)


def test_a_saved_v_prediction_model_carries_its_markers_and_loads_as_one(tmp_path):
    from nodes.demo import tiny_sd15

    model = tiny_sd15()
    assert not {"v_pred", "ztsnr"} & set(single_file_state_dict(model))
    v_model = model.with_sampling(V, zero_terminal_snr=True)
    path = tmp_path / "v.safetensors"
    save_single_file(v_model, path)
    with safe_open(str(path), "pt") as file:
        assert file.get_tensor("v_pred").numel() == 0 and file.get_tensor("ztsnr").numel() == 0
    loaded = StableDiffusion.from_checkpoint(path)
    assert (loaded.prediction_type, loaded.zero_terminal_snr) == (V, True)
    with pytest.raises(ValueError, match="cannot say the prediction type 'sample'"):
        single_file_state_dict(model.with_sampling(PredictionType.SAMPLE))


def test_with_sampling_shares_the_models_and_leaves_the_original_as_it_was():
    from nodes.demo import tiny_sd15

    model = tiny_sd15()
    other = model.with_sampling("v_prediction", True)
    assert (model.prediction_type, model.zero_terminal_snr) == (PredictionType.EPSILON, False)
    assert (other.prediction_type, other.zero_terminal_snr) == (V, True)
    assert other.unet is model.unet and other.autoencoder is model.autoencoder
    assert other.text_encoder is model.text_encoder
    assert model.with_sampling().prediction_type == PredictionType.EPSILON  # None keeps what it was
    solver = other.make_solver("euler", 10, "trailing")
    assert solver.params.prediction_type == V and solver.params.rescale_betas_zero_snr
    assert solver.sigmas[0] == pytest.approx(4096.0, rel=1e-6)


# -- A whole tiny v-prediction pipeline against diffusers -------------------------------------------------------

ZSNR_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    steps_offset=1,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    timestep_spacing="trailing",
)


def zsnr_scheduler(solver: str):
    if solver == "ddim":
        return DDIMScheduler(**ZSNR_SCHEDULER, clip_sample=False, set_alpha_to_one=False)
    if solver == "euler":
        return EulerDiscreteScheduler(**ZSNR_SCHEDULER)
    if solver == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**ZSNR_SCHEDULER, solver_order=2)
    return UniPCMultistepScheduler(**ZSNR_SCHEDULER, solver_type="bh2", solver_order=2)


@pytest.fixture(scope="module")
def components(tmp_path_factory):
    unet, vae, text = tiny_diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    ours = ours_from_diffusers(unet, vae, text).with_sampling(V, zero_terminal_snr=True)
    return dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer), ours


@pytest.mark.parametrize("solver", ["ddim", "euler", "dpmpp_2m", "uni_pc_bh2"])
def test_v_prediction_zero_snr_text_to_image_equals_diffusers(components, solver):
    parts, ours = components
    reference = StableDiffusionPipeline(
        **parts,
        scheduler=zsnr_scheduler(solver),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    expected = reference(
        "a red fox in the snow",
        negative_prompt="blurry",
        height=32,
        width=32,
        num_inference_steps=6,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(42),
        output_type="pt",
    ).images
    image = ours.text_to_image(
        "a red fox in the snow",
        "blurry",
        width=32,
        height=32,
        steps=6,
        guidance_scale=6.0,
        seed=42,
        solver=solver,
        schedule="trailing",
    )
    assert expected.std() > 0.01
    assert_parity("v_prediction_pipeline", image, expected)
    epsilon = ours.with_sampling(PredictionType.EPSILON, False).text_to_image(
        "a red fox in the snow",
        "blurry",
        width=32,
        height=32,
        steps=6,
        guidance_scale=6.0,
        seed=42,
        solver=solver,
    )
    assert (epsilon - image).abs().max().item() > 1e-3  # the prediction type is really used
