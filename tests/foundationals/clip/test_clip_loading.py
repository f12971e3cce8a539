"""CLIP loaders on files written in the real layouts: transformers folders (4.x and 5.x keys), SD1.5 and
SDXL single files, open_clip's fused layout (written here from transformers weights by the documented
open_clip <-> transformers correspondence, independently of foundationals/conversion/clip_keys.py)."""

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPTextConfig as TransformersTextConfig
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection
from transformers import CLIPVisionConfig as TransformersVisionConfig

from foundationals.clip.config import CLIPTextConfig
from foundationals.clip.image_encoder import (
    CLIPImageHiddenState,
    load_clip_image_encoder,
    load_clip_image_encoder_from_folder,
)
from foundationals.clip.text_encoder import (
    CLIPTextHiddenState,
    load_clip_text_encoder,
    load_clip_text_encoder_from_folder,
)
from foundationals.formats.clip import CLIPKeyError
from tests.support.parity import assert_parity


def randomized(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            is_norm_weight = "norm" in name and name.endswith("weight")
            parameter.normal_(1.0 if is_norm_weight else 0.0, 0.3)
    return model.eval()


def text_model(projection: bool, activation: str = "quick_gelu", seed: int = 0):
    config = TransformersTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=activation,
        projection_dim=24,
        eos_token_id=2,
    )
    return randomized((CLIPTextModelWithProjection if projection else CLIPTextModel)(config), seed)


def vision_model():
    config = TransformersVisionConfig(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=24,
        hidden_act="gelu",
    )
    return randomized(CLIPVisionModelWithProjection(config), 5)


TINY_TEXT = CLIPTextConfig(embedding_dim=32, num_layers=3, num_heads=4, feedforward_dim=37)
TINY_BIGG = CLIPTextConfig(
    embedding_dim=32, num_layers=3, num_heads=4, feedforward_dim=37, activation="gelu", projection_dim=24
)
IDS = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [0] * 70])


def max_diff(a, b):
    return (a - b).abs().max().item()


def assert_same_text_outputs(encoder, reference):
    with torch.no_grad():
        expected = reference(IDS, output_hidden_states=True)
        output = encoder(IDS)
    hidden = output[0] if isinstance(output, tuple) else output
    assert_parity("clip_loading", hidden, expected.last_hidden_state)
    if isinstance(output, tuple):
        assert_parity("clip_loading", output[1], expected.text_embeds)


def to_open_clip_text(state_dict, prefix=""):
    """transformers CLIPText* keys to open_clip's text tower, as open_clip's own conversion documents:
    q/k/v stacked into attn.in_proj_*, fc1/fc2 -> c_fc/c_proj, layer_norm1/2 -> ln_1/2, and the text
    projection stored as a matrix used as `x @ text_projection` (the transpose of nn.Linear's weight)."""
    names = {
        "layer_norm1": "ln_1",
        "layer_norm2": "ln_2",
        "mlp.fc1": "mlp.c_fc",
        "mlp.fc2": "mlp.c_proj",
        "self_attn.out_proj": "attn.out_proj",
    }
    out = {
        prefix + "token_embedding.weight": state_dict["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": state_dict["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": state_dict["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": state_dict["text_model.final_layer_norm.bias"],
        prefix + "text_projection": state_dict["text_projection.weight"].T.contiguous(),
        prefix + "logit_scale": torch.tensor(4.6052),
    }
    layer = 0
    while f"text_model.encoder.layers.{layer}.layer_norm1.weight" in state_dict:
        source, target = f"text_model.encoder.layers.{layer}.", f"{prefix}transformer.resblocks.{layer}."
        for old, new in names.items():
            for kind in ("weight", "bias"):
                out[f"{target}{new}.{kind}"] = state_dict[f"{source}{old}.{kind}"]
        for kind, fused in (("weight", "in_proj_weight"), ("bias", "in_proj_bias")):
            out[f"{target}attn.{fused}"] = torch.cat(
                [state_dict[f"{source}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            )
        layer += 1
    return out


def test_transformers_folders_load_with_safetensors_and_bin(tmp_path):
    reference = text_model(projection=True, activation="gelu")
    reference.save_pretrained(tmp_path / "safetensors")
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    for folder in ("safetensors", "bin"):
        encoder = load_clip_text_encoder_from_folder(tmp_path / folder)
        assert encoder.config == TINY_BIGG  # heads and activation from config.json
        assert_same_text_outputs(encoder, reference)


def test_transformers_5_layout_without_text_model_prefix():
    reference = text_model(projection=False)
    state_dict = {key.removeprefix("text_model."): value for key, value in reference.state_dict().items()}
    encoder = load_clip_text_encoder(state_dict, config=TINY_TEXT)  # auto-detected
    assert_same_text_outputs(encoder, reference)


def test_sd15_single_file_loads_the_text_encoder_among_other_models(tmp_path):
    reference = text_model(projection=False)
    checkpoint = {f"cond_stage_model.transformer.{k}": v for k, v in reference.state_dict().items()}
    checkpoint["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    checkpoint["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    checkpoint["first_stage_model.decoder.conv_in.weight"] = torch.zeros(4, 4, 3, 3)
    save_file(checkpoint, tmp_path / "sd15.safetensors")
    from safetensors.torch import load_file

    encoder = load_clip_text_encoder(load_file(tmp_path / "sd15.safetensors"), config=TINY_TEXT)
    assert_same_text_outputs(encoder, reference)


def test_sdxl_single_file_loads_clip_l_and_open_clip_bigg():
    clip_l, bigg = (
        text_model(projection=False, seed=1),
        text_model(projection=True, activation="gelu", seed=2),
    )
    checkpoint = {f"conditioner.embedders.0.transformer.{k}": v for k, v in clip_l.state_dict().items()}
    checkpoint |= to_open_clip_text(bigg.state_dict(), prefix="conditioner.embedders.1.model.")
    checkpoint["model.diffusion_model.out.2.weight"] = torch.zeros(4, 4, 3, 3)
    with pytest.raises(CLIPKeyError, match="several .*sdxl_clip_l, sdxl_clip_g"):
        load_clip_text_encoder(checkpoint)

    assert_same_text_outputs(load_clip_text_encoder(checkpoint, "sdxl_clip_l", config=TINY_TEXT), clip_l)
    encoder_g = load_clip_text_encoder(checkpoint, "sdxl_clip_g", config=TINY_BIGG)
    assert_same_text_outputs(encoder_g, bigg)
    with torch.no_grad():
        expected = bigg(IDS, output_hidden_states=True)
        penultimate, pooled = CLIPTextHiddenState(encoder_g, layer=-2, final_norm=False, pooled=True)(IDS)
    assert_parity("clip_loading", penultimate, expected.hidden_states[-2])
    assert_parity("clip_loading", pooled, expected.text_embeds)


def test_open_clip_layout_equals_the_transformers_layout():
    reference = text_model(projection=True, activation="gelu", seed=3)
    from_transformers = load_clip_text_encoder(reference.state_dict(), config=TINY_BIGG)
    from_open_clip = load_clip_text_encoder(to_open_clip_text(reference.state_dict()), config=TINY_BIGG)
    with torch.no_grad():
        for a, b in zip(from_transformers(IDS), from_open_clip(IDS)):
            assert_parity("clip_loading", a, b)


def test_config_is_inferred_from_shapes_for_preset_shapes():
    reference = text_model(projection=False)
    encoder = load_clip_text_encoder(reference.state_dict())  # the "tiny" preset's shape: heads from it
    assert encoder.config == TINY_TEXT
    assert_same_text_outputs(encoder, reference)


def test_weights_are_assigned_not_copied_and_dtype_is_applied():
    reference = text_model(projection=False)
    state_dict = reference.state_dict()
    encoder = load_clip_text_encoder(state_dict)
    assert all(p.device.type == "cpu" for p in encoder.parameters())
    token = state_dict["text_model.embeddings.token_embedding.weight"]
    assert any(p.data_ptr() == token.data_ptr() for p in encoder.parameters())
    half = load_clip_text_encoder(state_dict, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_missing_and_unexpected_keys_are_named():
    state_dict = text_model(projection=False).state_dict()
    missing = dict(state_dict)
    del missing["text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(CLIPKeyError, match=r"missing text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_clip_text_encoder(missing)
    extra = dict(state_dict)
    extra["text_model.encoder.layers.0.self_attn.lora_up.weight"] = torch.zeros(1)
    with pytest.raises(CLIPKeyError, match=r"unexpected text_model\.encoder\.layers\.0\.self_attn\.lora_up"):
        load_clip_text_encoder(extra)
    with pytest.raises(CLIPKeyError, match="no CLIP text encoder found.*model.diffusion_model.x"):
        load_clip_text_encoder({"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="unknown CLIP text layout 'diffusers'"):
        load_clip_text_encoder(state_dict, "diffusers")
    with pytest.raises(ValueError, match=r"embedding_dim=768 \(the weights have 32\)"):
        load_clip_text_encoder(state_dict, config=CLIPTextConfig())
    wide = text_model(projection=False)
    odd = {k: v for k, v in wide.state_dict().items() if ".layers.2." not in k}
    with pytest.raises(ValueError, match="matches no preset.*pass config="):
        load_clip_text_encoder(odd)


def test_image_encoder_folder_and_layouts(tmp_path):
    reference = vision_model()
    reference.save_pretrained(tmp_path / "image_encoder")
    encoder = load_clip_image_encoder_from_folder(tmp_path / "image_encoder")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        assert_parity("clip_loading", encoder(pixels), expected.image_embeds)
        assert_parity("clip_loading", CLIPImageHiddenState(encoder)(pixels), expected.hidden_states[-2])

    state_dict = reference.state_dict()
    unprefixed = {k.removeprefix("vision_model."): v for k, v in state_dict.items()}
    config = encoder.config
    with torch.no_grad():
        assert_parity(
            "clip_loading", load_clip_image_encoder(unprefixed, config=config)(pixels), encoder(pixels)
        )
        assert_parity(
            "clip_loading",
            load_clip_image_encoder(to_open_clip_visual(state_dict), config=config)(pixels),
            encoder(pixels),
        )
    no_projection = {k: v for k, v in state_dict.items() if k != "visual_projection.weight"}
    with pytest.raises(ValueError, match="no image projection"):
        load_clip_image_encoder(no_projection, config=config)


def to_open_clip_visual(state_dict):
    """transformers vision keys to open_clip's `visual.*`: conv1, class/positional embedding, ln_pre/ln_post,
    fused attention, and `proj` used as `x @ proj`."""
    out = {
        "visual.class_embedding": state_dict["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": state_dict["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": state_dict["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": state_dict["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": state_dict["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": state_dict["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": state_dict["vision_model.post_layernorm.bias"],
        "visual.proj": state_dict["visual_projection.weight"].T.contiguous(),
    }
    text_like = {k.replace("vision_model.", "text_model.", 1): v for k, v in state_dict.items()}
    text_like |= {
        "text_model.embeddings.token_embedding.weight": torch.zeros(1),
        "text_model.embeddings.position_embedding.weight": torch.zeros(1),
        "text_model.final_layer_norm.weight": torch.zeros(1),
        "text_model.final_layer_norm.bias": torch.zeros(1),
        "text_projection.weight": torch.zeros(1, 1),
    }
    layers = {k: v for k, v in to_open_clip_text(text_like).items() if k.startswith("transformer.")}
    return out | {f"visual.{k}": v for k, v in layers.items()}
