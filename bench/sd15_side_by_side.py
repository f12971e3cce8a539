"""Full-size SD1.5 with random weights in three implementations that share every weight tensor.

diffusers' `UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel` get the random
weights; ours and refiners 0.4.0's models are loaded from their state dicts with `assign=True`, so the
three hold the same storage (one copy in memory) and compute on identical weights. Ours go through our
own key maps; refiners' through its `ModelConverter` (execution-order tracing), whose key mapping is
computed once and cached in the bench folder. refiners 0.4.0 comes from a venv of its own
(`--system-site-packages`, so it sees this environment's torch and diffusers); its site-packages folder
is appended to `sys.path`, after ours, so nothing of the main environment changes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

REPOSITORY = Path(__file__).resolve().parent.parent
if str(REPOSITORY) not in sys.path:
    sys.path.insert(0, str(REPOSITORY))

REFINERS_VERSION = "0.4.0"
REFINERS_VENV = Path(os.environ.get("FLUXION_REFINERS_VENV", "/tmp/refiners-venv"))
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
)


def enable_refiners(install: bool = True) -> str | None:
    """Make refiners 0.4.0 importable (from its venv, created when missing); a note saying why not, else None."""
    site = (
        REFINERS_VENV / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    )
    if not (site / "refiners").is_dir() and install:
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", "--system-site-packages", str(REFINERS_VENV)],
                check=True,
                capture_output=True,
            )
            subprocess.run(
                [str(REFINERS_VENV / "bin" / "pip"), "install", "-q", f"refiners=={REFINERS_VERSION}"],
                check=True,
                capture_output=True,
                timeout=600,
            )
        except (OSError, subprocess.SubprocessError) as error:
            return f"refiners {REFINERS_VERSION} could not be installed in {REFINERS_VENV}: {error}"
    if not (site / "refiners").is_dir():
        return f"refiners {REFINERS_VERSION} is not installed in {REFINERS_VENV}"
    if str(site) not in sys.path:
        sys.path.append(str(site))
    try:
        import refiners.foundationals.latent_diffusion  # noqa: F401
    except ImportError as error:
        return f"refiners {REFINERS_VERSION} does not import here: {error}"
    return None


def random_weights(model: torch.nn.Module, seed: int) -> dict[str, Tensor]:
    """Random fp32 tensors for every state-dict entry: weights ~ N(0, 1/fan_in), norms ~ 1, biases small."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        shape = tuple(value.shape)
        if len(shape) > 1:
            tensor = torch.randn(shape, generator=generator) / math.sqrt(math.prod(shape[1:]))
        elif "norm" in key and key.endswith("weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = 0.02 * torch.randn(shape, generator=generator)
        tensors[key] = tensor
    return tensors


def _assign(model: torch.nn.Module, tensors: dict[str, Tensor]) -> None:
    model.load_state_dict(tensors, strict=True, assign=True)
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if meta:
        raise RuntimeError(f"{type(model).__name__}: tensors left on the meta device: {meta[:3]}")


@dataclass
class Reference:
    """diffusers' / transformers' SD1.5 models."""

    unet: Any
    autoencoder: Any
    text_encoder: Any


def diffusers_sd15(seed: int = 0) -> Reference:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet: Any
    autoencoder: Any
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768, sample_size=64)
        autoencoder = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
    _assign(unet, random_weights(unet, seed))
    _assign(autoencoder, random_weights(autoencoder, seed + 1))
    text = CLIPTextModel(  # OpenAI CLIP ViT-L/14's text tower (built on CPU: it has non-persistent buffers)
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768)
    )
    text.load_state_dict(random_weights(text, seed + 2), strict=True)
    return Reference(unet.eval(), autoencoder.eval(), text.eval())


def ours_sd15(reference: Reference) -> Any:
    """Our StableDiffusion on the reference's tensors (no copy)."""
    from foundationals.clip.text_encoder import load_clip_text_encoder
    from foundationals.formats.diffusers import diffusers_autoencoder_key_map, diffusers_unet_key_map
    from foundationals.latent_diffusion.auto_encoder import LatentDiffusionAutoencoder
    from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
    from foundationals.latent_diffusion.unet import UNet

    unet = UNet(device="meta")
    state = reference.unet.state_dict()
    _assign(unet, {ours: state[theirs] for theirs, ours in diffusers_unet_key_map(unet).items()})
    autoencoder = LatentDiffusionAutoencoder(device="meta")
    state = reference.autoencoder.state_dict()
    _assign(
        autoencoder,
        {ours: state[theirs] for theirs, ours in diffusers_autoencoder_key_map(autoencoder).items()},
    )
    text = load_clip_text_encoder(reference.text_encoder.state_dict(), "transformers")
    return StableDiffusion(unet=unet, autoencoder=autoencoder, text_encoder=text)


@dataclass
class Refiners:
    """refiners 0.4.0's SD1.5 models; `text_encoder` runs on token ids (its tokenizer taken out)."""

    unet: Any
    autoencoder: Any
    text_encoder: Any
    tokenizer: Any


def _refiners_models(device: str) -> tuple[Any, Any, Any]:
    from refiners.foundationals.clip.text_encoder import CLIPTextEncoderL
    from refiners.foundationals.latent_diffusion.stable_diffusion_1 import SD1Autoencoder, SD1UNet

    return (
        SD1UNet(in_channels=4, device=device),
        SD1Autoencoder(device=device),
        CLIPTextEncoderL(device=device),
    )


def _refiners_key_maps(reference: Reference, cache: Path) -> dict[str, dict[str, str]]:
    """{component: {refiners module path: diffusers/transformers module path}}, traced once and cached."""
    if cache.is_file():
        return json.loads(cache.read_text())
    from refiners.fluxion.model_converter import ModelConverter

    unet, autoencoder, text = (model.to_empty(device="cpu") for model in _refiners_models("meta"))
    text.pop(0)  # the tokenizer
    generator = torch.Generator().manual_seed(0)
    latents, timestep = torch.randn(1, 4, 8, 8, generator=generator), torch.tensor([10.0])
    context = torch.randn(1, 77, 768, generator=generator)
    unet.set_timestep(timestep)
    unet.set_clip_text_embedding(context)
    tokens = torch.randint(0, 49406, (1, 77), generator=generator)
    maps: dict[str, dict[str, str]] = {}
    with torch.no_grad():
        for name, source, target, source_args, target_args in (
            ("unet", reference.unet, unet, (latents, timestep, context), (latents,)),
            ("autoencoder", reference.autoencoder, autoencoder, (torch.randn(1, 3, 32, 32),), None),
            ("text_encoder", reference.text_encoder, text, (tokens,), None),
        ):
            converter = ModelConverter(source, target, skip_output_check=True, verbose=False)
            if not converter.run(source_args=source_args, target_args=target_args):
                raise RuntimeError(f"refiners' ModelConverter could not map the {name}")
            maps[name] = converter.get_mapping()
    cache.write_text(json.dumps(maps))
    return maps


def refiners_sd15(reference: Reference, cache_folder: Path) -> Refiners:
    """refiners 0.4.0's models on the reference's tensors (no copy); call `enable_refiners` first."""
    maps = _refiners_key_maps(reference, cache_folder / f"refiners-{REFINERS_VERSION}-sd15-keys.json")
    models = _refiners_models("meta")
    for mapping, source, target in zip(
        maps.values(), (reference.unet, reference.autoencoder, reference.text_encoder), models
    ):
        state = source.state_dict()
        tensors: dict[str, Tensor] = {}
        for key in target.state_dict():
            prefix, suffix = key.rsplit(".", 1)
            tensors[key] = state[f"{mapping[prefix]}.{suffix}"]
        _assign(target, tensors)
    unet, autoencoder, text = models
    tokenizer = text.pop(0)
    return Refiners(unet, autoencoder, text, tokenizer)
