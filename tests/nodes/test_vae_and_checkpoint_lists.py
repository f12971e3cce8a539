"""Fluxion Load VAE (models/vae) and the diffusers folders listed by Fluxion Load Checkpoint (headless)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.autoencoder_loading import AutoencoderFileError
from foundationals.latent_diffusion.model_config import AUTOENCODER_PRESETS
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from nodes.checkpoint_nodes import FluxionCheckpointLoader, checkpoint_names, checkpoint_path
from nodes.vae_nodes import FluxionLoadVAE, vae_names
from nodes.wires import VaeWire
from tests.foundationals.latent_diffusion.test_checkpoint_loading import (
    compare_autoencoder,
    diffusers_autoencoder,
)
from tests.support.parity import check_parity


def _wire(config=AUTOENCODER_PRESETS["tiny"]) -> VaeWire:
    model = StableDiffusion(unet=None, autoencoder=LatentDiffusionAutoencoder(config), text_encoder=None)  # type: ignore[arg-type]
    return VaeWire(model, "tiny.safetensors")


def test_load_vae_replaces_the_wires_vae_and_leaves_the_input_alone(headless_folders):
    reference = diffusers_autoencoder()
    vae_folder = headless_folders["models"] / "vae"
    reference.save_pretrained(vae_folder / "tiny-vae-diffusers")
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        str(vae_folder / "tiny_vae.safetensors"),
    )
    names = vae_names()
    assert "tiny_vae.safetensors" in names and "tiny-vae-diffusers" in names
    assert "vae" in FluxionLoadVAE.INPUT_TYPES()["required"]
    wire = _wire()
    original = wire.model.autoencoder
    for name in ("tiny_vae.safetensors", "tiny-vae-diffusers"):
        (loaded,) = FluxionLoadVAE().load(wire, name)
        assert wire.model.autoencoder is original and loaded.model.autoencoder is not original
        check_parity("checkpoint_loading", compare_autoencoder(reference, loaded.model.autoencoder))


def test_load_vae_refuses_another_latent_space(headless_folders):
    reference = diffusers_autoencoder()
    (headless_folders["models"] / "vae").mkdir()
    save_file(
        {k: v.contiguous() for k, v in reference.state_dict().items()},
        str(headless_folders["models"] / "vae" / "four_channels.safetensors"),
    )
    wire = _wire(AUTOENCODER_PRESETS["tiny"].with_changes(latent_channels=16))
    with pytest.raises(AutoencoderFileError, match="four_channels.safetensors.*4 latent channels.*needs 16"):
        FluxionLoadVAE().load(wire, "four_channels.safetensors")


def test_checkpoint_list_has_diffusers_folders_of_both_folders(headless_folders):
    models = headless_folders["models"]
    (models / "checkpoints" / "pipe" / "unet").mkdir(parents=True)
    (models / "checkpoints" / "pipe" / "model_index.json").write_text(json.dumps({"_class_name": "X"}))
    torch.save({}, models / "checkpoints" / "pipe" / "unet" / "diffusion_pytorch_model.bin")
    save_file({"a": torch.zeros(1)}, str(models / "checkpoints" / "single.safetensors"))
    (models / "diffusers" / "other").mkdir(parents=True)
    (models / "diffusers" / "other" / "model_index.json").write_text("{}")
    names = checkpoint_names()
    assert list(names) == ["single.safetensors", "pipe", "other"]  # files inside a pipeline are not listed
    assert FluxionCheckpointLoader.INPUT_TYPES()["required"]["ckpt_name"][0] == names
    assert checkpoint_path("pipe") == models / "checkpoints" / "pipe"
    assert checkpoint_path("other") == models / "diffusers" / "other"
    assert checkpoint_path("single.safetensors") == models / "checkpoints" / "single.safetensors"
