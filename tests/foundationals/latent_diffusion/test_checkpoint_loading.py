"""Loading original single files and diffusers folders, checked against diffusers on the same random weights.

The single-file fixtures are written in the LDM layout by running diffusers' own LDM -> diffusers
conversion (`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`) in reverse: it is fed an
LDM-keyed dict whose tensors carry their index, and where each one lands gives the correspondence
used to lay diffusers' random weights out under LDM names. The probe names are the loader's LDM key
list, so the fixture only exists if diffusers consumes every probe and fills every diffusers key
exactly once; a dropped or mismapped key fails either that bijection or the output comparison.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from foundationals.formats.ldm import ldm_autoencoder_key_map, ldm_unet_key_map
from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
from foundationals.latent_diffusion.checkpoint import CheckpointError, load_checkpoint, load_single_file
from foundationals.latent_diffusion.model_config import AUTOENCODER_PRESETS, UNET_PRESETS, UNetConfig
from foundationals.latent_diffusion.unet import UNet
from tests.support.parity import check_parity


def diffusers_unet(config: UNetConfig) -> UNet2DConditionModel:
    attention = [depth > 0 for depth in config.transformer_depth]
    kwargs: dict[str, Any] = dict(
        in_channels=config.in_channels,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        transformer_layers_per_block=[max(d, 1) for d in config.transformer_depth[:-1]]
        + [config.middle_transformer_depth],
        cross_attention_dim=config.context_dim,
        attention_head_dim=(
            [w // config.attention_head_dim for w in config.block_channels]
            if config.attention_head_dim
            else config.num_attention_heads
        ),
        use_linear_projection=config.use_linear_projection,
    )
    if config.addition_embedding == "text_time":
        kwargs.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=config.time_id_embedding_dim,
            projection_class_embeddings_input_dim=config.addition_embedding_dim,
        )
    torch.manual_seed(0)
    model = UNet2DConditionModel(**kwargs).eval()
    for parameter in model.parameters():  # no zero-initialised layer: every weight shows in the output
        parameter.data.normal_(0, 0.05 if parameter.dim() > 1 else 0.1)
    return model


def diffusers_autoencoder(scaling_factor: float = 0.18215) -> AutoencoderKL:
    config = AUTOENCODER_PRESETS["tiny"]
    torch.manual_seed(1)
    return AutoencoderKL(
        down_block_types=["DownEncoderBlock2D"] * len(config.block_channels),
        up_block_types=["UpDecoderBlock2D"] * len(config.block_channels),
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        scaling_factor=scaling_factor,
    ).eval()


def tiny_clip_text_model() -> CLIPTextModel:
    torch.manual_seed(2)
    config = CLIPTextConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37, projection_dim=32
    )
    return CLIPTextModel(config).eval()


def ldm_layout(
    probe_keys: list[str],
    probe_shapes: dict[str, tuple[int, ...]],
    convert: Any,
    state: dict[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """`state` (diffusers keys) laid out under LDM keys, by where diffusers' own conversion moves each probe."""
    probes = {key: torch.full((1,), float(index)) for index, key in enumerate(probe_keys)}
    landed = convert(probes)
    origin = {int(tensor.flatten()[0].item()): diffusers_key for diffusers_key, tensor in landed.items()}
    assert len(origin) == len(landed), "diffusers' conversion duplicated a probe"
    assert sorted(origin) == list(range(len(probe_keys))), "diffusers' conversion dropped probes"
    assert set(landed) == set(state), (
        f"not the diffusers model's keys: {sorted(set(landed) ^ set(state))[:5]}"
    )
    return {key: state[origin[index]].reshape(probe_shapes[key]) for index, key in enumerate(probe_keys)}


def ldm_unet_tensors(reference: UNet2DConditionModel, config: UNetConfig) -> dict[str, torch.Tensor]:
    unet = UNet(config, device="meta")
    shapes = {ours: tuple(tensor.shape) for ours, tensor in unet.state_dict().items()}
    keys = ["model.diffusion_model." + key for key in ldm_unet_key_map(unet)]
    probe_shapes = {"model.diffusion_model." + k: shapes[ours] for k, ours in ldm_unet_key_map(unet).items()}
    diffusers_config = {
        "layers_per_block": config.layers_per_block,
        "addition_embed_type": config.addition_embedding,
    }

    def convert(probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_ldm_unet_checkpoint(probes, diffusers_config)

    return ldm_layout(keys, probe_shapes, convert, reference.state_dict())


def ldm_autoencoder_tensors(reference: AutoencoderKL) -> dict[str, torch.Tensor]:
    autoencoder = LatentDiffusionAutoencoder(AUTOENCODER_PRESETS["tiny"], device="meta")
    shapes = {ours: tuple(tensor.shape) for ours, tensor in autoencoder.state_dict().items()}
    probe_shapes: dict[str, tuple[int, ...]] = {}
    for key, ours in ldm_autoencoder_key_map(autoencoder).items():
        shape = shapes[ours]
        if ".attn_1." in key and key.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")):
            shape = (*shape, 1, 1)  # LDM stores the autoencoder's attention as 1x1 convolutions
        probe_shapes["first_stage_model." + key] = shape
    levels = ["DownEncoderBlock2D"] * len(AUTOENCODER_PRESETS["tiny"].block_channels)

    def convert(probes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return convert_ldm_vae_checkpoint(probes, {"down_block_types": levels, "up_block_types": levels})

    return ldm_layout(list(probe_shapes), probe_shapes, convert, reference.state_dict())


def compare_unet(reference: UNet2DConditionModel, unet: UNet, config: UNetConfig) -> float:
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(2, config.in_channels, 16, 16, generator=generator)
    timestep = torch.tensor([999.0, 20.0])
    text = torch.randn(2, 7, config.context_dim, generator=generator)
    added = None
    if config.addition_embedding == "text_time":
        added = {
            "text_embeds": torch.randn(2, config.pooled_text_dim, generator=generator),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024], [768, 512, 16, 32, 1024, 1024]]),
        }
        unet.set_pooled_text_embedding(added["text_embeds"])
        unet.set_time_ids(added["time_ids"])
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(text)
    with torch.no_grad():
        expected = reference(x, timestep, text, added_cond_kwargs=added).sample
        return (unet(x) - expected).abs().max().item()


def compare_autoencoder(reference: AutoencoderKL, autoencoder: LatentDiffusionAutoencoder) -> float:
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1
    with torch.no_grad():
        latents = reference.encode(image).latent_dist.mode() * reference.config.scaling_factor
        decoded = reference.decode(latents / reference.config.scaling_factor).sample
        return max(
            (autoencoder.encode(image) - latents).abs().max().item(),
            (autoencoder.decode(latents) - decoded).abs().max().item(),
        )


@pytest.fixture(scope="module")
def sd15_parts():
    config = UNET_PRESETS["tiny"]
    unet, vae, clip = diffusers_unet(config), diffusers_autoencoder(), tiny_clip_text_model()
    tensors = {**ldm_unet_tensors(unet, config), **ldm_autoencoder_tensors(vae)}
    tensors.update({f"cond_stage_model.transformer.{k}": v for k, v in clip.state_dict().items()})
    return unet, vae, clip, tensors


def test_sd15_single_file_matches_diffusers(sd15_parts, tmp_path):
    reference_unet, reference_vae, clip, tensors = sd15_parts
    extras = {  # a full training checkpoint's extras: noise schedule buffers and EMA copies, all skipped
        "alphas_cumprod": torch.linspace(1, 0, 1000),
        "model_ema.decay": torch.tensor(0.9999),
        "model_ema.diffusion_modelout2weight": torch.zeros(4, 32, 3, 3),
    }
    path = tmp_path / "tiny-sd15.safetensors"
    save_file({**tensors, **extras}, str(path))
    checkpoint = load_checkpoint(path)
    assert checkpoint.family == "sd15"
    assert checkpoint.unet.config == UNET_PRESETS["tiny"]
    check_parity("checkpoint_loading", compare_unet(reference_unet, checkpoint.unet, UNET_PRESETS["tiny"]))
    assert checkpoint.autoencoder is not None and checkpoint.autoencoder.scaling_factor == 0.18215
    check_parity("checkpoint_loading", compare_autoencoder(reference_vae, checkpoint.autoencoder))
    tokens = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407, 49407]])
    with torch.no_grad():
        expected = clip(tokens).last_hidden_state
        actual = checkpoint.text_encoders["clip_l"](tokens)
    actual = actual[0] if isinstance(actual, tuple) else actual
    assert (actual - expected).abs().max().item() < 1e-5


def test_ckpt_with_nested_state_dict_loads(sd15_parts, tmp_path):
    reference_unet, reference_vae, _, tensors = sd15_parts
    path = tmp_path / "tiny-sd15.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1}, path)
    checkpoint = load_single_file(path, text_encoders=False)
    check_parity("checkpoint_loading", compare_unet(reference_unet, checkpoint.unet, UNET_PRESETS["tiny"]))
    assert checkpoint.autoencoder is not None
    check_parity("checkpoint_loading", compare_autoencoder(reference_vae, checkpoint.autoencoder))


def test_fp16_file_loads_and_computes_in_fp32(sd15_parts, tmp_path):
    reference_unet, _, _, tensors = sd15_parts
    path = tmp_path / "tiny-sd15-fp16.safetensors"
    save_file({key: value.half() for key, value in tensors.items()}, str(path))
    checkpoint = load_single_file(path, text_encoders=False)
    assert {p.dtype for p in checkpoint.unet.parameters()} == {torch.float32}
    rounded = diffusers_unet(UNET_PRESETS["tiny"])
    rounded.load_state_dict({k: v.half().float() for k, v in reference_unet.state_dict().items()})
    check_parity("checkpoint_loading", compare_unet(rounded, checkpoint.unet, UNET_PRESETS["tiny"]))


def test_sd15_inpainting_single_file_is_detected(tmp_path):
    config = UNET_PRESETS["tiny"].with_changes(in_channels=9)
    reference = diffusers_unet(config)
    path = tmp_path / "tiny-inpainting.safetensors"
    save_file(ldm_unet_tensors(reference, config), str(path))
    checkpoint = load_single_file(path)
    assert checkpoint.family == "sd15_inpainting" and checkpoint.autoencoder is None
    check_parity("checkpoint_loading", compare_unet(reference, checkpoint.unet, config))


def test_sdxl_single_file_matches_diffusers(tmp_path):
    config = UNET_PRESETS["tiny_sdxl"]
    reference, reference_vae, clip = (
        diffusers_unet(config),
        diffusers_autoencoder(0.13025),
        tiny_clip_text_model(),
    )
    path = tmp_path / "tiny-sdxl.safetensors"
    clip_l = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip.state_dict().items()}
    save_file(
        {**ldm_unet_tensors(reference, config), **ldm_autoencoder_tensors(reference_vae), **clip_l}, str(path)
    )
    checkpoint = load_single_file(path)
    assert list(checkpoint.text_encoders) == ["clip_l"]  # SGM layout: handed to foundationals.clip
    assert checkpoint.family == "sdxl_base" and checkpoint.unet.config == config
    check_parity("checkpoint_loading", compare_unet(reference, checkpoint.unet, config))
    assert checkpoint.autoencoder is not None and checkpoint.autoencoder.scaling_factor == 0.13025
    check_parity("checkpoint_loading", compare_autoencoder(reference_vae, checkpoint.autoencoder))


def test_diffusers_folder_matches_diffusers(sd15_parts, tmp_path):
    reference_unet, reference_vae, clip, _ = sd15_parts
    reference_unet.save_pretrained(tmp_path / "unet")
    reference_vae.save_pretrained(tmp_path / "vae")
    clip.save_pretrained(tmp_path / "text_encoder")
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.family == "sd15"
    check_parity("checkpoint_loading", compare_unet(reference_unet, checkpoint.unet, UNET_PRESETS["tiny"]))
    assert checkpoint.autoencoder is not None
    check_parity("checkpoint_loading", compare_autoencoder(reference_vae, checkpoint.autoencoder))
    assert "clip_l" in checkpoint.text_encoders


def test_sdxl_diffusers_folder_config_is_read(tmp_path):
    config = UNET_PRESETS["tiny_sdxl"]
    reference = diffusers_unet(config)
    reference.save_pretrained(tmp_path / "unet")
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.family == "sdxl_base" and checkpoint.unet.config == config
    check_parity("checkpoint_loading", compare_unet(reference, checkpoint.unet, config))


def meta_ldm_file(path: Path, config: UNetConfig, extra: dict[str, torch.Tensor] | None = None) -> Path:
    """A file with every LDM UNet key of `config` (zeros): enough for detection and key checks."""
    unet = UNet(config, device="meta")
    shapes = {ours: tuple(tensor.shape) for ours, tensor in unet.state_dict().items()}
    tensors = {
        f"model.diffusion_model.{k}": torch.zeros(shapes[o]) for k, o in ldm_unet_key_map(unet).items()
    }
    save_file({**tensors, **(extra or {})}, str(path))
    return path


def test_sd2_like_file_is_refused_clearly(tmp_path):
    path = meta_ldm_file(
        tmp_path / "sd2-like.safetensors", UNET_PRESETS["tiny"].with_changes(context_dim=1024)
    )
    with pytest.raises(CheckpointError, match=r"sd2-like\.safetensors: unsupported: this looks like SD2\.x"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "Stable Diffusion 3"),
        (["double_blocks.0.img_attn.norm.key_norm.scale", "single_blocks.0.linear1.weight"], "Flux"),
        (["foo.weight", "bar.bias"], "not a Stable Diffusion checkpoint: no UNet keys"),
    ],
)
def test_other_files_are_refused_clearly(tmp_path, keys, message):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2) for key in keys}, str(path))
    with pytest.raises(CheckpointError, match=message) as error:
        load_checkpoint(path)
    assert "other.safetensors" in str(error.value)


def test_junk_bytes_are_refused_clearly(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        load_checkpoint(path)


def test_missing_and_unmapped_keys_are_named(tmp_path):
    config = UNET_PRESETS["tiny"]
    path = meta_ldm_file(
        tmp_path / "extra.safetensors",
        config,
        {"model.diffusion_model.input_blocks.1.0.mystery.weight": torch.zeros(1)},
    )
    with pytest.raises(
        CheckpointError,
        match=r"extra\.safetensors.*unmapped keys: model\.diffusion_model\.input_blocks\.1\.0\.mystery",
    ):
        load_checkpoint(path)
    unet = UNet(config, device="meta")
    shapes = {ours: tuple(tensor.shape) for ours, tensor in unet.state_dict().items()}
    tensors = {
        f"model.diffusion_model.{k}": torch.zeros(shapes[o]) for k, o in ldm_unet_key_map(unet).items()
    }
    del tensors["model.diffusion_model.output_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"]
    save_file(tensors, str(tmp_path / "missing.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"missing\.safetensors.*missing keys: .*output_blocks\.4\.1\.transformer_blocks\.0\.attn2\.to_k",
    ):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_file({**tensors, "mystery.weight": torch.zeros(1)}, str(tmp_path / "stray.safetensors"))
    with pytest.raises(CheckpointError, match="belong to no known part: mystery.weight"):
        load_checkpoint(tmp_path / "stray.safetensors")
