"""T2I-Adapter: models, file layouts, the patch and stacking with ControlNet, against diffusers.

Measured max abs differences (torch 2.13 CPU, fp32, tiny random weights): T2IAdapter features (full,
light, full_xl) within `t2i_adapter`'s tolerance; StableDiffusionAdapterPipeline images (single: 8e-6 measured; MultiAdapter),
within `t2i_adapter_pipeline`'s; one UNet call with a ControlNet and a T2I-Adapter stacked, and an SDXL UNet
with a full_adapter_xl (features inside the down blocks and after the middle block): `t2i_adapter` (tolerances: tests/support/parity.py).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, MultiAdapter, StableDiffusionAdapterPipeline, UNet2DConditionModel
from safetensors.torch import save_file

from foundationals.formats.diffusers import diffusers_unet_key_map
from foundationals.latent_diffusion.adapters.controlnet import ControlMismatchError, ControlNetPatch
from foundationals.latent_diffusion.adapters.t2i_adapter import (
    T2IAdapter,
    T2IAdapterConfig,
    T2IAdapterPatch,
    load_t2i_adapter,
)
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet
from foundationals.model_files import ModelFileError
from tests.support.parity import assert_parity, check_parity
from tests.support.tiny_control import (
    diffusers_controlnet,
    diffusers_t2i_adapter,
    ours_from_diffusers_controlnet,
    redraw,
)
from tests.support.tiny_sd import (
    clip_tokenizer,
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)

SIZE, LATENT = 32, 8
SD15_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    num_train_timesteps=1000,
)
KINDS = {  # ours, diffusers (channels, adapter_type, downscale factor)
    "full": (T2IAdapterConfig("full", (32, 64, 64), 2, 3, 4), ((32, 64, 64), "full_adapter", 4)),
    "light": (T2IAdapterConfig("light", (32, 64, 64), 2, 3, 4), ((32, 64), "light_adapter", 4)),
    "full_xl": (
        T2IAdapterConfig("full_xl", (32, 64, 64, 64), 2, 3, 16),
        ((32, 64, 64, 64), "full_adapter_xl", 16),
    ),
}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def reference_adapter(kind: str, seed: int = 0):
    channels, adapter_type, factor = KINDS[kind][1]
    return diffusers_t2i_adapter(channels, adapter_type, factor, seed=seed)


def ours_from(reference, kind: str) -> T2IAdapter:
    """Our adapter on the reference's weights, through its diffusers-layout file."""
    from foundationals.formats.t2i_adapter import t2i_adapter_key_map

    adapter = T2IAdapter(KINDS[kind][0], device="meta")
    state = reference.state_dict()
    adapter.load_state_dict(
        {ours: state[k] for k, ours in t2i_adapter_key_map(adapter, "diffusers").items()}, assign=True
    )
    return adapter


def features(adapter, hint: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(adapter(hint))


@pytest.mark.parametrize("kind", list(KINDS))
def test_t2i_adapter_features_match_diffusers(kind):
    reference = reference_adapter(kind)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected, result = features(reference, hint), features(ours_from(reference, kind), hint)
    assert [f.shape for f in result] == [f.shape for f in expected]
    check_parity("t2i_adapter", max(max_diff(a, b) for a, b in zip(result, expected)))


def tencentarc_state(reference, kind: str) -> dict[str, torch.Tensor]:
    """diffusers' adapter weights under TencentARC's original names (ldm/modules/encoders/adapter.py)."""
    state, blocks = reference.state_dict(), 2
    result = {}
    for key, tensor in state.items():
        parts = key.removeprefix("adapter.").split(".")
        if parts[0] == "body" and kind == "light" and parts[2] == "resnets":
            parts[2] = "body"  # extractor.body.j
        elif parts[0] == "body" and kind != "light":
            level = int(parts[1])
            if parts[2] == "resnets":  # ResnetBlock number level * nums_rb + j
                parts = ["body", str(level * blocks + int(parts[3])), *parts[4:]]
            else:  # in_conv belongs to the level's first ResnetBlock
                parts = ["body", str(level * blocks), *parts[2:]]
        result[".".join(parts)] = tensor
    return result


@pytest.mark.parametrize("kind", ["full", "light", "full_xl"])
def test_tencentarc_and_diffusers_files_load_the_same_weights(kind, tmp_path):
    reference = reference_adapter(kind, seed=2)
    reference.save_pretrained(tmp_path / "diffusers", safe_serialization=True)
    save_file(tencentarc_state(reference, kind), tmp_path / "t2iadapter_tiny.safetensors")
    first = load_t2i_adapter(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors")
    second = load_t2i_adapter(tmp_path / "t2iadapter_tiny.safetensors")
    assert first.config == second.config == KINDS[kind][0]
    a, b = first.state_dict(), second.state_dict()
    assert all(torch.equal(a[key], b[key]) for key in a)
    hint = torch.rand(1, 3, 64, 64)
    assert_parity("t2i_adapter", features(first, hint), features(reference, hint))


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    unet, vae, text = diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder()
    tokenizer = clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))
    adapters = [reference_adapter("full", seed=3), reference_adapter("light", seed=4)]
    return (
        dict(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer),
        ours_from_diffusers(unet, vae, text),
        adapters,
        [ours_from(adapters[0], "full"), ours_from(adapters[1], "light")],
    )


def run_ours(
    sd: StableDiffusion, patches, steps: int = 3, seed: int = 5, guidance: float = 5.0
) -> torch.Tensor:
    positive, negative = sd.encode_prompt("a tree"), sd.encode_prompt("")
    run = SamplingRun(steps, 0, LATENT, LATENT, 1, uses_guidance=guidance > 1)
    with patched(sd, patches, run):
        latents = sd.sample(
            (1, 4, LATENT, LATENT),
            positive,
            negative,
            make_solver("ddim", steps),
            guidance,
            seed,
            step_hook=run.run_step_hooks,
        )
    return sd.decode_latents(latents)


def run_diffusers(parts, adapter, image, steps: int = 3, seed: int = 5, guidance: float = 5.0, **kwargs):
    pipeline = StableDiffusionAdapterPipeline(
        **parts[0],
        adapter=adapter,
        scheduler=DDIMScheduler(**SD15_SCHEDULER, clip_sample=False, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        "a tree",
        image=image,
        negative_prompt="",
        height=SIZE,
        width=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2)  # this pipeline decodes to numpy (B, H, W, C)


def test_adapter_pipelines_match_diffusers(parts):
    generator = torch.Generator().manual_seed(6)
    first, second = (torch.rand(1, 3, SIZE, SIZE, generator=generator) for _ in range(2))
    expected = run_diffusers(parts, parts[2][0], first, adapter_conditioning_scale=0.8)
    result = run_ours(parts[1], [T2IAdapterPatch(parts[3][0], first.permute(0, 2, 3, 1), 0.8)])
    assert max_diff(result, run_ours(parts[1], [])) > 1e-3
    assert_parity("t2i_adapter_pipeline", result, expected)

    expected = run_diffusers(
        parts, MultiAdapter(parts[2]), [first, second], adapter_conditioning_scale=[0.5, 0.9]
    )
    patches = [
        T2IAdapterPatch(parts[3][0], first.permute(0, 2, 3, 1), 0.5),
        T2IAdapterPatch(parts[3][1], second.permute(0, 2, 3, 1), 0.9),
    ]
    assert_parity("t2i_adapter_pipeline", run_ours(parts[1], patches), expected)


def test_controlnet_and_t2i_adapter_stack_like_diffusers_unet(parts):
    sd, reference_unet = parts[1], parts[0]["unet"]
    controlnet_reference = diffusers_controlnet(seed=7)
    controlnet = ours_from_diffusers_controlnet(controlnet_reference)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, LATENT, LATENT, generator=generator)
    text = torch.randn(2, 7, 32, generator=generator)
    hint = torch.rand(1, 3, SIZE, SIZE, generator=generator)
    timestep = torch.tensor([600.0])
    before_repr = repr(sd.unet)
    with torch.no_grad():
        down, mid = controlnet_reference(
            x,
            timestep,
            encoder_hidden_states=text,
            controlnet_cond=torch.cat([hint, hint]),
            conditioning_scale=0.7,
            return_dict=False,
        )
        adapter_features = [f * 0.6 for f in parts[2][0](hint)]
        expected = reference_unet(
            x,
            timestep,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            down_intrablock_additional_residuals=[torch.cat([f, f]) for f in adapter_features],
        ).sample
        plain = reference_unet(x, timestep, encoder_hidden_states=text).sample
    run = SamplingRun(1, 0, LATENT, LATENT, 1, uses_guidance=True)
    patches = [
        T2IAdapterPatch(parts[3][0], hint.permute(0, 2, 3, 1), 0.6),
        ControlNetPatch(controlnet, hint.permute(0, 2, 3, 1), 0.7),
    ]
    with patched(sd, patches, run):
        run.run_step_hooks(0)
        sd.unet.set_timestep(timestep)
        sd.unet.set_clip_text_embedding(text)
        with torch.no_grad():
            result = sd.unet(x)
    assert_parity("t2i_adapter", result, expected)
    assert repr(sd.unet) == before_repr
    sd.unet.set_timestep(timestep)
    with torch.no_grad():
        assert_parity("t2i_adapter", sd.unet(x), plain)


def sdxl_unets() -> tuple[UNet2DConditionModel, UNet]:
    config = TINY_SDXL_UNET
    torch.manual_seed(9)
    reference = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=config.block_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        cross_attention_dim=config.context_dim,
        attention_head_dim=[max(w // config.attention_head_dim, 1) for w in config.block_channels],
        transformer_layers_per_block=[1, 1, 2],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.time_id_embedding_dim,
        projection_class_embeddings_input_dim=config.addition_embedding_dim,
    ).eval()
    redraw(reference)
    ours = UNet(config, device="meta")
    state = reference.state_dict()
    ours.load_state_dict({o: state[t] for t, o in diffusers_unet_key_map(ours).items()}, assign=True)
    return reference, ours


def test_sdxl_adapter_features_go_where_diffusers_puts_them():
    reference_unet, unet = sdxl_unets()
    reference = reference_adapter("full_xl", seed=10)
    adapter = ours_from(reference, "full_xl")
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    text = torch.randn(1, 7, 48, generator=generator)
    pooled = torch.randn(1, 40, generator=generator)
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])
    hint = torch.rand(1, 3, LATENT * 8, LATENT * 8, generator=generator)
    with torch.no_grad():
        expected = reference_unet(
            x,
            torch.tensor([300.0]),
            encoder_hidden_states=text,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            down_intrablock_additional_residuals=list(reference(hint)),
        ).sample
    model = StableDiffusion(unet=unet, autoencoder=None, text_encoder=None)  # type: ignore[arg-type]
    run = SamplingRun(1, 0, LATENT, LATENT, 1, uses_guidance=False)
    with patched(model, [T2IAdapterPatch(adapter, hint.permute(0, 2, 3, 1))], run):
        unet.set_timestep(torch.tensor([300.0]))
        unet.set_clip_text_embedding(text)
        unet.set_pooled_text_embedding(pooled)
        unet.set_time_ids(time_ids)
        with torch.no_grad():
            result = unet(x)
    assert_parity("t2i_adapter", result, expected)


def test_wrong_family_and_wrong_kind_are_refused(parts, tmp_path):
    sd = parts[1]
    xl = ours_from(reference_adapter("full_xl"), "full_xl")
    before = repr(sd.unet)
    with pytest.raises(ControlMismatchError, match=r"is for SDXL \(full_xl adapter\); the model is SD1.5"):
        with patched(
            sd,
            [
                T2IAdapterPatch(parts[3][0], torch.rand(1, 32, 32, 3)),
                T2IAdapterPatch(xl, torch.rand(1, 32, 32, 3)),
            ],
            SamplingRun(1, 0, LATENT, LATENT, 1, False),
        ):
            pass
    assert repr(sd.unet) == before
    reference_adapter("full_xl").save_pretrained(tmp_path / "xl", safe_serialization=True)
    with pytest.raises(ModelFileError, match="T2I-Adapter file .* is for SDXL"):
        load_t2i_adapter(tmp_path / "xl" / "diffusion_pytorch_model.safetensors", base=sd.unet.config)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError, match="this is a LoRA, not a T2I-Adapter"):
        load_t2i_adapter(tmp_path / "lora.safetensors")


def test_outside_start_end_the_trajectory_is_the_unadapted_one(parts):
    sd, adapter = parts[1], parts[3][0]
    hint = torch.rand(1, SIZE, SIZE, 3, generator=torch.Generator().manual_seed(9))
    positive, negative = sd.encode_prompt("a tree"), sd.encode_prompt("")

    def trajectory(patches: list) -> list[torch.Tensor]:
        steps: list[torch.Tensor] = []
        run = SamplingRun(6, 0, LATENT, LATENT, 1, uses_guidance=True)
        with patched(sd, patches, run):
            sd.sample(
                (1, 4, LATENT, LATENT),
                positive,
                negative,
                make_solver("ddim", 6),
                5.0,
                5,
                callback=lambda done, total, latents: steps.append(latents.clone()),
                step_hook=run.run_step_hooks,
            )
        return steps

    plain = trajectory([])
    late = trajectory([T2IAdapterPatch(adapter, hint, 1.0, start=0.5, end=1.0)])
    assert all(torch.equal(a, b) for a, b in zip(plain[:3], late[:3]))  # steps 0-2: before the window
    assert max_diff(plain[-1], late[-1]) > 1e-4
    early = trajectory([T2IAdapterPatch(adapter, hint, 1.0, start=0.0, end=0.5)])
    assert max_diff(plain[0], early[0]) > 1e-4  # the adapter acts from the first step
