"""LoRA format normalization: files written by diffusers/peft and in kohya/LyCORIS layouts → canonical deltas.

Reference deltas come from diffusers' own loader (`load_lora_weights` into peft layers); kohya and
LyCORIS fixtures are written from key maps this test states by hand, never from our tables.
"""

import warnings

import pytest
import torch
from safetensors.torch import save_file

from foundationals.formats.lora import (
    SD15,
    SDXL,
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    UNET,
    LoraNamespace,
    UNetLayout,
    canonical_modules,
    kohya_name_table,
    normalize_lora,
)
from foundationals.latent_diffusion.adapters.lora import load_lora_state_dict
from tests.support.parity import check_parity

warnings.filterwarnings("ignore")

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# The tiny model layouts of foundationals.latent_diffusion.model_config (TINY_UNET, TINY_SDXL_UNET).
TINY_SD15 = LoraNamespace("SD1.5", UNetLayout((32, 64, 64), (1, 1, 0), 1), {TEXT_ENCODER: 2})
TINY_SDXL = LoraNamespace(
    "SDXL",
    UNetLayout((32, 64, 64), (0, 1, 2), 2, has_add_embedding=True),
    {TEXT_ENCODER: 2, TEXT_ENCODER_2: 2},
    projected_text_encoders=(TEXT_ENCODER_2,),
)
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
CONV_TARGETS = [
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def tiny_text_encoder(projection: bool = False):
    config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100
    )
    model_class = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return model_class(config).eval()


def tiny_sd15_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
        sample_size=16,
    ).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(),
        tokenizer=None,
        unet=unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=48,
        attention_head_dim=(2, 4, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=40 + 6 * 8,
        norm_num_groups=32,
        sample_size=16,
    ).eval()
    vae = diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4)
    return diffusers.StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=tiny_text_encoder(),
        text_encoder_2=tiny_text_encoder(projection=True),
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(),
    )


def add_random_peft_loras(model, targets, rank=4, alpha=8.0, seed=1, use_dora=False):
    """A peft LoRA with random A and B (peft starts B at zero), as a trained one would be."""
    model.add_adapter(
        peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_dora=use_dora),
        adapter_name="trained",
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
                if "magnitude" in name:
                    parameter.abs_().add_(0.5)
    return model


def peft_layers(model, adapter):
    """module path → peft LoRA layer holding `adapter`."""
    return {
        name: module
        for name, module in model.named_modules()
        if hasattr(module, "lora_A") and adapter in module.lora_A
    }


def reference_deltas(pipe, folder, weight_name, components=(UNET, TEXT_ENCODER)):
    """(component, module) → ΔW after diffusers' `load_lora_weights` (peft's `get_delta_weight`)."""
    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="ref")
    deltas = {}
    for component in components:
        for name, layer in peft_layers(getattr(pipe, component), "ref").items():
            deltas[(component, name)] = layer.get_delta_weight("ref").detach()
    pipe.delete_adapters("ref")
    return deltas


def base_shapes(pipe, components=(UNET, TEXT_ENCODER)):
    """(component, module) → weight shape of every Linear/Conv2d (peft wrappers seen through)."""
    return {
        (component, name.replace(".base_layer", "")): module.weight.shape
        for component in components
        for name, module in getattr(pipe, component).named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name
    }


def our_deltas(lora_file, shapes):
    return {
        (weights.component, weights.module): weights.delta_weight(shapes[(weights.component, weights.module)])
        for weights in lora_file.weights
    }


def assert_same_deltas(ours, reference):
    assert set(ours) == set(reference)
    worst = max((ours[key] - reference[key]).abs().max().item() for key in reference)
    check_parity("lora_deltas", worst)


@pytest.fixture(scope="module")
def sd15_pipe():
    return tiny_sd15_pipeline()


@pytest.fixture(scope="module")
def sd15_peft_file(sd15_pipe, tmp_path_factory):
    """A LoRA as diffusers writes it (`save_lora_weights` of peft layers, alpha in the metadata)."""
    from peft.utils import get_peft_model_state_dict

    unet = add_random_peft_loras(tiny_sd15_pipeline().unet, UNET_TARGETS + ["conv1"], rank=4, alpha=8.0)
    text_encoder = add_random_peft_loras(tiny_text_encoder(), TEXT_TARGETS, rank=2, alpha=1.0, seed=2)
    folder = tmp_path_factory.mktemp("peft_lora")
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="trained"),
        text_encoder_lora_layers=get_peft_model_state_dict(text_encoder, adapter_name="trained"),
        unet_lora_adapter_metadata=unet.peft_config["trained"].to_dict(),
        text_encoder_lora_adapter_metadata=text_encoder.peft_config["trained"].to_dict(),
    )
    return folder, unet, text_encoder


def test_peft_file_written_by_diffusers_matches_diffusers_loader(sd15_pipe, sd15_peft_file):
    folder, _, _ = sd15_peft_file
    state_dict, metadata = load_lora_state_dict(folder / "pytorch_lora_weights.safetensors")
    lora_file = normalize_lora(state_dict, TINY_SD15, metadata)
    assert lora_file.format == "peft" and lora_file.unmatched == []
    assert {w.alpha / w.rank for w in lora_file.weights if w.component == UNET} == {2.0}  # alpha 8 / rank 4
    reference = reference_deltas(sd15_pipe, folder, "pytorch_lora_weights.safetensors")
    assert_same_deltas(our_deltas(lora_file, base_shapes(sd15_pipe)), reference)
    kinds = {w.module.rsplit(".", 1)[-1]: w.kind for w in lora_file.weights}
    assert kinds["conv1"] == "conv" and kinds["proj_in"] == "conv" and kinds["to_q"] == "linear"


def kohya_from_peft(models, prefixes, alpha=3.0):
    """sd-scripts' naming, written from its documented rule: `prefix + "_" + module.replace(".", "_")`."""
    state_dict = {}
    for component, model in models.items():
        for module, layer in peft_layers(model, "trained").items():
            name = f"{prefixes[component]}_{module.replace('.', '_')}"
            state_dict[f"{name}.lora_down.weight"] = layer.lora_A["trained"].weight.detach().clone()
            state_dict[f"{name}.lora_up.weight"] = layer.lora_B["trained"].weight.detach().clone()
            state_dict[f"{name}.alpha"] = torch.tensor(alpha)
    return state_dict


def test_kohya_sd15_file_matches_diffusers_loader(sd15_pipe, sd15_peft_file, tmp_path):
    _, unet, text_encoder = sd15_peft_file
    state_dict = kohya_from_peft(
        {UNET: unet, TEXT_ENCODER: text_encoder}, {UNET: "lora_unet", TEXT_ENCODER: "lora_te"}
    )
    save_file(state_dict, tmp_path / "kohya.safetensors")
    lora_file = normalize_lora(load_lora_state_dict(tmp_path / "kohya.safetensors")[0], TINY_SD15)
    assert lora_file.format == "kohya" and lora_file.unmatched == []
    assert len(lora_file.weights) == len(state_dict) // 3
    reference = reference_deltas(sd15_pipe, tmp_path, "kohya.safetensors")
    assert_same_deltas(our_deltas(lora_file, base_shapes(sd15_pipe)), reference)


def test_legacy_diffusers_key_styles_read_like_peft(sd15_pipe, sd15_peft_file):
    """Older diffusers files: `.lora.down.weight` (UNet), `.lora_linear_layer.` (text encoder), attention processors."""
    folder, _, _ = sd15_peft_file
    state_dict, _ = load_lora_state_dict(folder / "pytorch_lora_weights.safetensors")
    legacy, processors = {}, {}
    for key, tensor in state_dict.items():
        role = "down" if ".lora_A." in key else "up"
        module = key.replace(".lora_A.weight", "").replace(".lora_B.weight", "")
        style = "lora" if key.startswith("unet.") else "lora_linear_layer"
        legacy[f"{module}.{style}.{role}.weight"] = tensor
        head, _, last = module.rpartition(".")
        if module.endswith("to_out.0"):
            processors[f"{module[: -len('.to_out.0')]}.processor.to_out_lora.{role}.weight"] = tensor
        elif last in ("to_q", "to_k", "to_v"):
            processors[f"{head}.processor.{last}_lora.{role}.weight"] = tensor
        elif last in ("q_proj", "k_proj", "v_proj", "out_proj"):
            processor_name = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}[
                last
            ]
            processors[f"{head}.{processor_name}_lora.{role}.weight"] = tensor
    shapes = base_shapes(sd15_pipe)
    expected = our_deltas(normalize_lora(state_dict, TINY_SD15), shapes)
    for variant in (legacy, processors):
        lora_file = normalize_lora(variant, TINY_SD15)
        assert lora_file.format == "diffusers" and lora_file.unmatched == []
        ours = our_deltas(lora_file, shapes)
        assert set(ours) <= set(expected) and len(ours) == len(variant) // 2
        assert all(torch.equal(ours[key], expected[key]) for key in ours)


# The tiny SDXL UNet's LDM (sgm) names, by hand: input_blocks counts conv_in, then (resnet[, attention])
# per layer and a downsampler per level; output_blocks (resnet[, attention][, upsampler]).
SDXL_LDM_BLOCKS = {
    "input_blocks.1.0": "down_blocks.0.resnets.0",
    "input_blocks.2.0": "down_blocks.0.resnets.1",
    "input_blocks.3.0.op": "down_blocks.0.downsamplers.0.conv",
    "input_blocks.4.0": "down_blocks.1.resnets.0",
    "input_blocks.4.1": "down_blocks.1.attentions.0",
    "input_blocks.5.0": "down_blocks.1.resnets.1",
    "input_blocks.5.1": "down_blocks.1.attentions.1",
    "input_blocks.6.0.op": "down_blocks.1.downsamplers.0.conv",
    "input_blocks.7.0": "down_blocks.2.resnets.0",
    "input_blocks.7.1": "down_blocks.2.attentions.0",
    "input_blocks.8.0": "down_blocks.2.resnets.1",
    "input_blocks.8.1": "down_blocks.2.attentions.1",
    "middle_block.0": "mid_block.resnets.0",
    "middle_block.1": "mid_block.attentions.0",
    "middle_block.2": "mid_block.resnets.1",
    "output_blocks.0.0": "up_blocks.0.resnets.0",
    "output_blocks.0.1": "up_blocks.0.attentions.0",
    "output_blocks.1.0": "up_blocks.0.resnets.1",
    "output_blocks.1.1": "up_blocks.0.attentions.1",
    "output_blocks.2.0": "up_blocks.0.resnets.2",
    "output_blocks.2.1": "up_blocks.0.attentions.2",
    "output_blocks.2.2.conv": "up_blocks.0.upsamplers.0.conv",
    "output_blocks.3.0": "up_blocks.1.resnets.0",
    "output_blocks.3.1": "up_blocks.1.attentions.0",
    "output_blocks.4.0": "up_blocks.1.resnets.1",
    "output_blocks.4.1": "up_blocks.1.attentions.1",
    "output_blocks.5.0": "up_blocks.1.resnets.2",
    "output_blocks.5.1": "up_blocks.1.attentions.2",
    "output_blocks.5.2.conv": "up_blocks.1.upsamplers.0.conv",
    "output_blocks.6.0": "up_blocks.2.resnets.0",
    "output_blocks.7.0": "up_blocks.2.resnets.1",
    "output_blocks.8.0": "up_blocks.2.resnets.2",
}
LDM_RESNET = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


def ldm_name(module: str) -> str:
    for ldm, diffusers_prefix in SDXL_LDM_BLOCKS.items():
        if module == diffusers_prefix:
            return ldm
        if module.startswith(diffusers_prefix + "."):
            rest = module[len(diffusers_prefix) + 1 :]
            return f"{ldm}.{LDM_RESNET.get(rest, rest)}"
    raise KeyError(module)


@pytest.fixture(scope="module")
def sdxl_pipe():
    return tiny_sdxl_pipeline()


def test_kohya_sdxl_file_with_ldm_names_matches_diffusers_loader(sdxl_pipe, tmp_path):
    pipe = tiny_sdxl_pipeline()
    unet = add_random_peft_loras(
        pipe.unet, UNET_TARGETS + ["conv1", "conv2", "time_emb_proj", "conv_shortcut"]
    )
    te1 = add_random_peft_loras(pipe.text_encoder, TEXT_TARGETS, seed=3)
    te2 = add_random_peft_loras(pipe.text_encoder_2, TEXT_TARGETS, seed=4)
    state_dict = kohya_from_peft(
        {UNET: unet, TEXT_ENCODER: te1, TEXT_ENCODER_2: te2},
        {UNET: "lora_unet", TEXT_ENCODER: "lora_te1", TEXT_ENCODER_2: "lora_te2"},
    )
    renamed = {}  # UNet names in LDM spelling, as sd-scripts writes them for SDXL
    for module in peft_layers(unet, "trained"):
        old = f"lora_unet_{module.replace('.', '_')}"
        new = f"lora_unet_{ldm_name(module).replace('.', '_')}"
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            renamed[f"{new}.{suffix}"] = state_dict.pop(f"{old}.{suffix}")
    state_dict.update(renamed)
    assert any(
        key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for key in state_dict
    )
    save_file(state_dict, tmp_path / "sdxl_kohya.safetensors")
    lora_file = normalize_lora(load_lora_state_dict(tmp_path / "sdxl_kohya.safetensors")[0], TINY_SDXL)
    assert lora_file.unmatched == [] and lora_file.components == {UNET, TEXT_ENCODER, TEXT_ENCODER_2}
    assert "SDXL" in lora_file.family_hint
    components = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
    reference = reference_deltas(sdxl_pipe, tmp_path, "sdxl_kohya.safetensors", components)
    assert_same_deltas(our_deltas(lora_file, base_shapes(sdxl_pipe, components)), reference)


def test_our_module_lists_are_the_real_diffusers_and_transformers_modules(sd15_pipe, sdxl_pipe):
    for namespace, pipe in ((TINY_SD15, sd15_pipe), (TINY_SDXL, sdxl_pipe)):
        real = base_shapes(pipe, (UNET, *namespace.text_encoder_layers))
        for component, modules in canonical_modules(namespace).items():
            assert {name for c, name in real if c == component} == set(modules), (namespace.name, component)


def test_full_size_tables_cover_sd15_and_sdxl_names():
    sd15, sdxl = kohya_name_table(SD15), kohya_name_table(SDXL)
    assert sdxl["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"] == (
        UNET,
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    )
    assert sdxl["lora_unet_middle_block_1_transformer_blocks_9_ff_net_2"][1] == (
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2"
    )
    assert sdxl["lora_unet_output_blocks_5_2_conv"][1] == "up_blocks.1.upsamplers.0.conv"
    assert sdxl["lora_te2_text_model_encoder_layers_31_mlp_fc2"] == (
        TEXT_ENCODER_2,
        "text_model.encoder.layers.31.mlp.fc2",
    )
    assert sd15["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"][1].endswith(
        "attn2.to_k"
    )
    assert (
        sd15["lora_unet_output_blocks_2_1_conv"][1] == "up_blocks.0.upsamplers.0.conv"
    )  # no attention at 1280/8
    assert sd15["lora_unet_input_blocks_1_1_proj_in"][1] == "down_blocks.0.attentions.0.proj_in"
    assert sd15["lora_te_text_model_encoder_layers_11_self_attn_out_proj"][1].endswith(
        "layers.11.self_attn.out_proj"
    )
    assert not any(name.startswith("lora_te1_") for name in sd15)


def kohya_layer(module="down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"):
    return f"lora_unet_{module}"


def test_loha_delta_equals_published_formula():
    torch.manual_seed(0)
    name, rank, alpha = kohya_layer(), 3, 1.5
    w1a, w1b, w2a, w2b = (
        torch.randn(32, rank),
        torch.randn(rank, 32),
        torch.randn(32, rank),
        torch.randn(rank, 32),
    )
    state_dict = {
        f"{name}.hada_w1_a": w1a,
        f"{name}.hada_w1_b": w1b,
        f"{name}.hada_w2_a": w2a,
        f"{name}.hada_w2_b": w2b,
        f"{name}.alpha": torch.tensor(alpha),
    }
    (weights,) = normalize_lora(state_dict, TINY_SD15).weights
    assert weights.method == "loha" and weights.module.endswith("attn1.to_q")
    expected = torch.empty(32, 32)
    for i in range(32):
        for j in range(32):  # ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha / rank
            expected[i, j] = (w1a[i] @ w1b[:, j]) * (w2a[i] @ w2b[:, j]) * alpha / rank
    assert torch.allclose(weights.delta_weight((32, 32)), expected, atol=1e-5)


def test_loha_tucker_conv_delta_equals_published_formula():
    torch.manual_seed(0)
    name, rank = kohya_layer("down_blocks_0_resnets_0_conv1"), 2
    t1, t2 = torch.randn(rank, rank, 3, 3), torch.randn(rank, rank, 3, 3)
    w1a, w1b, w2a, w2b = (torch.randn(rank, 32) for _ in range(4))  # Tucker layout: (rank, out), (rank, in)
    state_dict = dict(
        zip(
            [f"{name}.hada_{s}" for s in ("t1", "t2", "w1_a", "w1_b", "w2_a", "w2_b")],
            (t1, t2, w1a, w1b, w2a, w2b),
        )
    )
    (weights,) = normalize_lora(state_dict, TINY_SD15).weights
    assert weights.kind == "conv" and weights.scale == 1.0
    first = sum(
        t1[a, b][None, None] * torch.outer(w1a[a], w1b[b])[:, :, None, None]
        for a in range(rank)
        for b in range(rank)
    )
    second = sum(
        t2[a, b][None, None] * torch.outer(w2a[a], w2b[b])[:, :, None, None]
        for a in range(rank)
        for b in range(rank)
    )
    assert torch.allclose(weights.delta_weight((32, 32, 3, 3)), first * second, atol=1e-4)


@pytest.mark.parametrize("factored", [False, True])
def test_lokr_delta_equals_published_formula(factored):
    torch.manual_seed(0)
    name, alpha = kohya_layer("down_blocks_0_resnets_0_conv1"), 4.0
    w1 = torch.randn(4, 2)
    w2a, w2b = torch.randn(8, 2, 3, 3).flatten(1)[:, :2], torch.randn(2, 16 * 9)
    state_dict = {f"{name}.lokr_w1": w1, f"{name}.alpha": torch.tensor(alpha)}
    if factored:  # w2 = w2_a @ w2_b, scale alpha / rank(w2_b)
        state_dict |= {f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b}
        w2, scale = (w2a @ w2b).reshape(8, 16, 3, 3), alpha / 2
    else:  # both factors full: no rank, scale 1
        w2, scale = torch.randn(8, 16, 3, 3), 1.0
        state_dict[f"{name}.lokr_w2"] = w2
    (weights,) = normalize_lora(state_dict, TINY_SD15).weights
    expected = torch.empty(32, 32, 3, 3)
    for i in range(4):
        for j in range(2):  # Kronecker product: block (i, j) is w1[i, j] · w2
            expected[i * 8 : (i + 1) * 8, j * 16 : (j + 1) * 16] = w1[i, j] * w2
    assert weights.method == "lokr" and weights.scale == scale
    assert torch.allclose(weights.delta_weight((32, 32, 3, 3)), expected * scale, atol=1e-5)


def test_locon_tucker_mid_delta():
    torch.manual_seed(0)
    name = kohya_layer("down_blocks_0_resnets_0_conv1")
    down, mid, up = torch.randn(2, 32, 1, 1), torch.randn(2, 2, 3, 3), torch.randn(32, 2, 1, 1)
    state_dict = {
        f"{name}.lora_down.weight": down,
        f"{name}.lora_mid.weight": mid,
        f"{name}.lora_up.weight": up,
    }
    (weights,) = normalize_lora(state_dict, TINY_SD15).weights
    expected = sum(
        mid[a, b][None, None] * torch.outer(up[:, a, 0, 0], down[b, :, 0, 0])[:, :, None, None]
        for a in range(2)
        for b in range(2)
    )
    assert torch.allclose(weights.delta_weight((32, 32, 3, 3)), expected, atol=1e-5)


def test_unplaceable_keys_are_reported_and_family_is_named():
    state_dict = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(
            2, 32
        ),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(
            32, 2
        ),
        "lora_unet_not_a_layer.lora_down.weight": torch.zeros(2, 4),
        "lora_unet_not_a_layer.lora_up.weight": torch.zeros(4, 2),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.hada_w1_a": torch.zeros(4, 2),  # LoHa missing factors
        "something_else": torch.zeros(1),
    }
    lora_file = normalize_lora(state_dict, TINY_SD15)
    assert len(lora_file.weights) == 1
    assert "something_else" in lora_file.unmatched
    assert any("not_a_layer" in item for item in lora_file.unmatched)
    assert any("loha weights without" in item for item in lora_file.unmatched)
    sdxl_file = normalize_lora(
        {"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32)}
    )
    assert sdxl_file.family_hint is not None and sdxl_file.family_hint.startswith("SDXL")


def test_peft_sdxl_file_written_by_diffusers_matches_diffusers_loader(sdxl_pipe, tmp_path):
    """SDXL LoRA as diffusers writes it: `unet.*`, `text_encoder.*`, `text_encoder_2.*` peft keys, alphas in metadata."""
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_sdxl_pipeline()
    unet = add_random_peft_loras(pipe.unet, UNET_TARGETS + ["conv1"], rank=4, alpha=8.0)
    te1 = add_random_peft_loras(pipe.text_encoder, TEXT_TARGETS, rank=2, alpha=1.0, seed=3)
    te2 = add_random_peft_loras(pipe.text_encoder_2, TEXT_TARGETS, rank=2, alpha=4.0, seed=4)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        str(tmp_path),
        unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="trained"),
        text_encoder_lora_layers=get_peft_model_state_dict(te1, adapter_name="trained"),
        text_encoder_2_lora_layers=get_peft_model_state_dict(te2, adapter_name="trained"),
        unet_lora_adapter_metadata=unet.peft_config["trained"].to_dict(),
        text_encoder_lora_adapter_metadata=te1.peft_config["trained"].to_dict(),
        text_encoder_2_lora_adapter_metadata=te2.peft_config["trained"].to_dict(),
    )
    state_dict, metadata = load_lora_state_dict(tmp_path / "pytorch_lora_weights.safetensors")
    lora_file = normalize_lora(state_dict, TINY_SDXL, metadata)
    assert lora_file.format == "peft" and lora_file.unmatched == []
    assert lora_file.components == {UNET, TEXT_ENCODER, TEXT_ENCODER_2}
    assert {w.alpha / w.rank for w in lora_file.weights if w.component == TEXT_ENCODER_2} == {2.0}
    components = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)
    reference = reference_deltas(sdxl_pipe, tmp_path, "pytorch_lora_weights.safetensors", components)
    assert_same_deltas(our_deltas(lora_file, base_shapes(sdxl_pipe, components)), reference)
