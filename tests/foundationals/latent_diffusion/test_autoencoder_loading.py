"""Standalone VAE files (models/vae) against diffusers' AutoencoderKL on the same random weights.

Fixtures: the diffusers layouts are written by diffusers itself (`save_pretrained` for the folder, its
`state_dict()` for the single file, as sdxl_vae.safetensors is); the LDM single file (vae-ft-mse-840000's
layout, no prefix) by running diffusers' LDM -> diffusers conversion in reverse (test_checkpoint_loading's
`ldm_autoencoder_tensors`), plus a `loss.*` key as training `.ckpt` files carry. Tolerance: the
"checkpoint_loading" entry of tests/support/parity.py (same as checkpoint VAEs).
"""

import json

import pytest
import torch
from safetensors.torch import save_file

from foundationals.latent_diffusion.autoencoder_loading import (
    AutoencoderFileError,
    is_diffusers_autoencoder_folder,
    load_autoencoder,
)
from tests.foundationals.latent_diffusion.test_checkpoint_loading import (
    compare_autoencoder,
    diffusers_autoencoder,
    ldm_autoencoder_tensors,
)
from tests.support.parity import check_parity


@pytest.fixture(scope="module")
def reference():
    return diffusers_autoencoder(scaling_factor=0.13025)


def test_ldm_single_file(tmp_path, reference):
    tensors = {
        key.removeprefix("first_stage_model."): value.contiguous()
        for key, value in ldm_autoencoder_tensors(reference).items()
    }
    tensors["loss.discriminator.main.0.weight"] = torch.zeros(2, 2)  # training leftovers are skipped
    path = tmp_path / "vae-ft-mse.safetensors"
    save_file(tensors, str(path))
    autoencoder = load_autoencoder(path, scaling_factor=0.13025)
    assert autoencoder.config.scaling_factor == 0.13025
    check_parity("checkpoint_loading", compare_autoencoder(reference, autoencoder))


def test_a_full_checkpoints_vae_part(tmp_path, reference):
    tensors = {key: value.contiguous() for key, value in ldm_autoencoder_tensors(reference).items()}
    tensors["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    path = tmp_path / "checkpoint.safetensors"
    save_file(tensors, str(path))
    check_parity("checkpoint_loading", compare_autoencoder(reference, load_autoencoder(path, 0.13025)))


def test_diffusers_single_file(tmp_path, reference):
    path = tmp_path / "sdxl_vae.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    check_parity("checkpoint_loading", compare_autoencoder(reference, load_autoencoder(path, 0.13025)))


def test_diffusers_folder_takes_its_scaling_factor(tmp_path, reference):
    folder = tmp_path / "sdxl-vae-fp16-fix"
    reference.save_pretrained(folder)
    assert is_diffusers_autoencoder_folder(folder)
    autoencoder = load_autoencoder(folder, scaling_factor=0.5)  # the folder's config wins
    assert autoencoder.config.scaling_factor == 0.13025
    check_parity("checkpoint_loading", compare_autoencoder(reference, autoencoder))


def test_wrong_files_are_named(tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, str(lora))
    with pytest.raises(AutoencoderFileError, match=r"style\.safetensors.*a LoRA, not a VAE"):
        load_autoencoder(lora, 0.18215)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(AutoencoderFileError, match="not a diffusers VAE folder"):
        load_autoencoder(folder, 0.18215)
