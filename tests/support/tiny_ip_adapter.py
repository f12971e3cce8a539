"""Tiny IP-Adapter fixtures: a transformers CLIP vision encoder saved with `save_pretrained`, IP-Adapter files in
the tencent-ailab layout written from random tensors (shapes from the documented layout, not from our key map),
and a helper that samples with our pipeline under a stack of patches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from foundationals.clip.config import CLIPImageConfig, image_preset
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion

TINY_IMAGE = image_preset("tiny")  # 32 wide hidden states, 24 wide projected embedding, 32x32 pixels
PLUS_DIM, PLUS_INNER, PLUS_QUERIES = 64, 64, 6  # resampler width, attention width (1 head of 64), tokens


def transformers_image_encoder(
    config: CLIPImageConfig = TINY_IMAGE, seed: int = 0
) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=config.embedding_dim,
            intermediate_size=config.feedforward_dim,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            image_size=config.image_size,
            patch_size=config.patch_size,
            projection_dim=config.projection_dim,
            hidden_act=config.activation,
        )
    ).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm_weight = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
            parameter.normal_(1.0 if is_norm_weight else 0.0, 0.3)
    return model


def cross_attention_widths(diffusers_unet) -> list[int]:
    """Hidden size of every attn2 in diffusers' processor order (the order of `ip_adapter.N`)."""
    widths = []
    for name, module in diffusers_unet.named_modules():
        if name.endswith("attn2"):
            widths.append(module.to_k.out_features)
    return widths


def tencent_ip_adapter(
    kind: str,
    attention_widths: list[int],
    context_dim: int,
    image_config: CLIPImageConfig = TINY_IMAGE,
    seed: int = 0,
) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": ..., "ip_adapter": ...} as tencent-ailab's training script saves, from random tensors."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=generator)

    if kind == "base":
        tokens = 4
        image_proj = {
            "proj.weight": rand(tokens * context_dim, image_config.projection_dim),
            "proj.bias": rand(tokens * context_dim),
            "norm.weight": rand(context_dim, mean=1.0, scale=0.1),
            "norm.bias": rand(context_dim),
        }
    else:
        image_proj = {
            "latents": rand(1, PLUS_QUERIES, PLUS_DIM, scale=PLUS_DIM**-0.5),
            "proj_in.weight": rand(PLUS_DIM, image_config.embedding_dim),
            "proj_in.bias": rand(PLUS_DIM),
            "proj_out.weight": rand(context_dim, PLUS_DIM),
            "proj_out.bias": rand(context_dim),
            "norm_out.weight": rand(context_dim, mean=1.0, scale=0.1),
            "norm_out.bias": rand(context_dim),
        }
        for layer in range(4):
            prefix = f"layers.{layer}."
            image_proj |= {
                prefix + "0.norm1.weight": rand(PLUS_DIM, mean=1.0, scale=0.1),
                prefix + "0.norm1.bias": rand(PLUS_DIM),
                prefix + "0.norm2.weight": rand(PLUS_DIM, mean=1.0, scale=0.1),
                prefix + "0.norm2.bias": rand(PLUS_DIM),
                prefix + "0.to_q.weight": rand(PLUS_INNER, PLUS_DIM),
                prefix + "0.to_kv.weight": rand(2 * PLUS_INNER, PLUS_DIM),
                prefix + "0.to_out.weight": rand(PLUS_DIM, PLUS_INNER),
                prefix + "1.0.weight": rand(PLUS_DIM, mean=1.0, scale=0.1),
                prefix + "1.0.bias": rand(PLUS_DIM),
                prefix + "1.1.weight": rand(4 * PLUS_DIM, PLUS_DIM),
                prefix + "1.3.weight": rand(PLUS_DIM, 4 * PLUS_DIM),
            }
    ip_adapter: dict[str, torch.Tensor] = {}
    for index, width in enumerate(attention_widths):
        ip_adapter[f"{2 * index + 1}.to_k_ip.weight"] = rand(width, context_dim)
        ip_adapter[f"{2 * index + 1}.to_v_ip.weight"] = rand(width, context_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def write_tencent_file(weights: dict[str, dict[str, torch.Tensor]], path: Path) -> Path:
    """`.bin`: the nested dict through torch.save; `.safetensors`: flat `image_proj.*` / `ip_adapter.*` names."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".bin":
        torch.save(weights, path)
    else:
        flat = {
            f"{group}.{key}": value.contiguous()
            for group, items in weights.items()
            for key, value in items.items()
        }
        save_file(flat, str(path))
    return path


def sample_with_patches(
    sd: StableDiffusion,
    patches: list,
    prompt: str = "a photo of a cat",
    negative_prompt: str = "",
    size: int = 32,
    steps: int = 4,
    guidance_scale: float = 5.0,
    seed: int = 0,
    callback=None,
    decode: bool = True,
) -> torch.Tensor:
    """Our txt2img (DDIM) with `patches` applied for the run, undone afterwards."""
    positive = sd.encode_prompt(prompt)
    negative = sd.encode_prompt(negative_prompt)
    factor = sd.autoencoder.config.downscale_factor
    shape = (1, sd.latent_channels, size // factor, size // factor)
    solver = make_solver("ddim", steps, "normal", prediction_type=sd.prediction_type)
    run = SamplingRun(
        num_steps=steps,
        first_step=0,
        latent_height=shape[2],
        latent_width=shape[3],
        batch_size=1,
        uses_guidance=guidance_scale > 1.0,
    )
    with patched(sd, patches, run):
        latents = sd.sample(
            shape,
            positive,
            negative,
            solver,
            guidance_scale,
            seed,
            callback=callback,
            run=run,
        )
    return sd.decode_latents(latents) if decode else latents


FACE_DIM = 512  # insightface's identity embedding, as the real files read
FACEID_HIDDEN = 1024  # 2 x 512, as the releases (diffusers infers the multiplier from it)


def tencent_faceid(
    kind: str,
    attention_widths: list[int],
    context_dim: int,
    image_config: CLIPImageConfig = TINY_IMAGE,
    seed: int = 0,
    tokens: int = 4,
    self_attention_widths: list[int] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """A FaceID ("faceid") or FaceID Plus ("faceid_plus") file as tencent-ailab's ip_adapter_faceid saves it:
    `image_proj` = MLPProjModel (`proj.0`, `proj.2`, `norm`) or ProjModelFaceIdPlus (the same, plus
    `perceiver_resampler.*` without latents), `ip_adapter` = to_k_ip / to_v_ip of every cross-attention and the
    LoRA of every attention processor (`N.to_{q,k,v,out}_lora.{down,up}.weight`, N over attn1 and attn2)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2, mean: float = 0.0) -> torch.Tensor:
        return mean + scale * torch.randn(*shape, generator=generator)

    dim = context_dim
    image_proj = {
        "proj.0.weight": rand(FACEID_HIDDEN, FACE_DIM, scale=0.05),
        "proj.0.bias": rand(FACEID_HIDDEN),
        "proj.2.weight": rand(tokens * dim, FACEID_HIDDEN),
        "proj.2.bias": rand(tokens * dim),
        "norm.weight": rand(dim, mean=1.0, scale=0.1),
        "norm.bias": rand(dim),
    }
    if kind == "faceid_plus":
        prefix = "perceiver_resampler."
        image_proj |= {
            prefix + "proj_in.weight": rand(dim, image_config.embedding_dim),
            prefix + "proj_in.bias": rand(dim),
            prefix + "proj_out.weight": rand(context_dim, dim),
            prefix + "proj_out.bias": rand(context_dim),
            prefix + "norm_out.weight": rand(context_dim, mean=1.0, scale=0.1),
            prefix + "norm_out.bias": rand(context_dim),
        }
        for layer in range(4):
            key = f"{prefix}layers.{layer}."
            image_proj |= {
                key + "0.norm1.weight": rand(dim, mean=1.0, scale=0.1),
                key + "0.norm1.bias": rand(dim),
                key + "0.norm2.weight": rand(dim, mean=1.0, scale=0.1),
                key + "0.norm2.bias": rand(dim),
                key + "0.to_q.weight": rand(PLUS_INNER, dim),
                key + "0.to_kv.weight": rand(2 * PLUS_INNER, dim),
                key + "0.to_out.weight": rand(dim, PLUS_INNER),
                key + "1.0.weight": rand(dim, mean=1.0, scale=0.1),
                key + "1.0.bias": rand(dim),
                key + "1.1.weight": rand(4 * dim, dim),
                key + "1.3.weight": rand(dim, 4 * dim),
            }
    ip_adapter: dict[str, torch.Tensor] = {}
    selfs = self_attention_widths or attention_widths
    for index, width in enumerate(attention_widths):
        for n, (w, ctx) in ((2 * index, (selfs[index], selfs[index])), (2 * index + 1, (width, context_dim))):
            for name in ("to_q", "to_k", "to_v", "to_out"):
                source = w if name in ("to_q", "to_out") else ctx
                ip_adapter[f"{n}.{name}_lora.down.weight"] = rand(4, source if name != "to_out" else w)
                ip_adapter[f"{n}.{name}_lora.up.weight"] = rand(w, 4)
        ip_adapter[f"{2 * index + 1}.to_k_ip.weight"] = rand(width, context_dim)
        ip_adapter[f"{2 * index + 1}.to_v_ip.weight"] = rand(width, context_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}
