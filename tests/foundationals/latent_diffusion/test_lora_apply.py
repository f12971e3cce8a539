"""Applying LoRAs: stacking with strengths, fuse/unfuse bit-exactness, clear wrong-family errors, diffusers parity."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fluxion.layers as fl
from foundationals.conversion.lora_keys import TEXT_ENCODER, UNET, LoraNamespace, UNetLayout, normalize_lora
from foundationals.latent_diffusion.lora import LoraMismatchError, SDLoraManager

warnings.filterwarnings("ignore")

TOY = LoraNamespace("toy", UNetLayout((8,), (1,), 1, 1), {TEXT_ENCODER: 1})
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CONV = "down_blocks.0.resnets.0.conv1"
TEXT = "text_model.encoder.layers.0.mlp.fc1"


BASE_LAYERS = {}  # the toy's original layers, by model: adapters take their places in the tree


def toy_model():
    """A UNet-ish and a text-encoder-ish Chain, with a hand-made canonical → ours module map."""
    torch.manual_seed(0)
    unet = fl.Chain(fl.Chain(fl.Conv2d(8, 8, 3, padding=1), fl.SiLU()), fl.Linear(8, 8))
    text = fl.Chain(fl.Linear(6, 10), fl.SiLU())
    maps = {UNET: {CONV: "Chain.Conv2d", ATTN: "Linear"}, TEXT_ENCODER: {TEXT: "Linear"}}
    BASE_LAYERS[id(unet)] = (unet[0][0], unet[1], text[0])
    return unet, text, SDLoraManager({UNET: unet, TEXT_ENCODER: text}, maps, TOY)


def toy_inputs():
    generator = torch.Generator().manual_seed(5)
    return torch.randn(2, 8, 5, 5, generator=generator), torch.randn(2, 5, 6, generator=generator)


def run_toy(unet, text):
    image, tokens = toy_inputs()
    with torch.no_grad():
        hidden = unet[0](image)
        return unet[1](hidden.permute(0, 2, 3, 1)), text(tokens)


def hand_toy(unet, text, deltas):
    """The toy model's output with `deltas` ({module: ΔW}) added to its base weights, by hand."""
    image, tokens = toy_inputs()
    conv, linear, fc = BASE_LAYERS[id(unet)]
    with torch.no_grad():
        hidden = F.silu(F.conv2d(image, conv.weight + deltas.get(CONV, 0), conv.bias, padding=1))
        out = F.linear(hidden.permute(0, 2, 3, 1), linear.weight + deltas.get(ATTN, 0), linear.bias)
        return out, F.silu(F.linear(tokens, fc.weight + deltas.get(TEXT, 0), fc.bias))


def random_lora_files(seed=0):
    """Three LoRAs of different methods, in kohya/LyCORIS layout."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.3

    k_attn, k_conv, k_text = (
        f"lora_unet_{ATTN.replace('.', '_')}",
        f"lora_unet_{CONV.replace('.', '_')}",
        f"lora_te_{TEXT.replace('.', '_')}",
    )
    plain = {  # LoRA + LoCon 3x3 + text encoder LoRA, with alphas
        f"{k_attn}.lora_down.weight": r(2, 8),
        f"{k_attn}.lora_up.weight": r(8, 2),
        f"{k_attn}.alpha": torch.tensor(1.0),
        f"{k_conv}.lora_down.weight": r(3, 8, 3, 3),
        f"{k_conv}.lora_up.weight": r(8, 3, 1, 1),
        f"{k_conv}.alpha": torch.tensor(6.0),
        f"{k_text}.lora_down.weight": r(2, 6),
        f"{k_text}.lora_up.weight": r(10, 2),
    }
    loha = {  # LoHa on the linear, Tucker LoCon on the conv
        f"{k_attn}.hada_w1_a": r(8, 2),
        f"{k_attn}.hada_w1_b": r(2, 8),
        f"{k_attn}.hada_w2_a": r(8, 2),
        f"{k_attn}.hada_w2_b": r(2, 8),
        f"{k_attn}.alpha": torch.tensor(4.0),
        f"{k_conv}.lora_down.weight": r(2, 8, 1, 1),
        f"{k_conv}.lora_mid.weight": r(2, 2, 3, 3),
        f"{k_conv}.lora_up.weight": r(8, 2, 1, 1),
    }
    lokr = {  # LoKr on the conv (w2 factored), on the text encoder (full factors)
        f"{k_conv}.lokr_w1": r(2, 4),
        f"{k_conv}.lokr_w2_a": r(4, 2),
        f"{k_conv}.lokr_w2_b": r(2, 2 * 9),
        f"{k_conv}.alpha": torch.tensor(1.0),
        f"{k_text}.lokr_w1": r(2, 3),
        f"{k_text}.lokr_w2": r(5, 2),
    }
    return {"plain": plain, "loha": loha, "lokr": lokr}


def file_deltas(state_dict, shapes, unet_scale, text_scale):
    deltas = {}
    for weights in normalize_lora(state_dict, TOY).weights:
        scale = unet_scale if weights.component == UNET else text_scale
        deltas[weights.module] = weights.delta_weight(shapes[weights.module]) * scale
    return deltas


TOY_SHAPES = {ATTN: (8, 8), CONV: (8, 8, 3, 3), TEXT: (10, 6)}
STRENGTHS = {"plain": (0.8, 0.5), "loha": (-0.6, 1.0), "lokr": (1.3, 0.25)}


def summed_deltas():
    total = {}
    for name, state_dict in random_lora_files().items():
        for module, delta in file_deltas(state_dict, TOY_SHAPES, *STRENGTHS[name]).items():
            total[module] = total.get(module, 0) + delta
    return total


def load_all(manager):
    reports = {}
    for name, state_dict in random_lora_files().items():
        unet_scale, text_scale = STRENGTHS[name]
        reports[name] = manager.add_loras(
            name, state_dict, unet_scale=unet_scale, text_encoder_scale=text_scale
        )
    return reports


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_three_loras_at_different_strengths_add_their_deltas():
    unet, text, manager = toy_model()
    reports = load_all(manager)
    assert reports["plain"].applied_count == 3 and reports["plain"].not_applied == []
    assert reports["lokr"].applied_count == 2
    assert max_diff(run_toy(unet, text), hand_toy(unet, text, summed_deltas())) < 1e-5


def test_remove_and_clear_restore_base_outputs_and_tree_bit_for_bit():
    unet, text, manager = toy_model()
    base, trees = run_toy(unet, text), (repr(unet), repr(text))
    load_all(manager)
    manager.remove_loras("loha")
    expected = {}
    for name in ("plain", "lokr"):
        for module, delta in file_deltas(random_lora_files()[name], TOY_SHAPES, *STRENGTHS[name]).items():
            expected[module] = expected.get(module, 0) + delta
    assert max_diff(run_toy(unet, text), hand_toy(unet, text, expected)) < 1e-5
    manager.clear()
    assert all(torch.equal(a, b) for a, b in zip(run_toy(unet, text), base))
    assert (repr(unet), repr(text)) == trees


def test_fuse_merges_everything_and_unfuse_restores_the_base_weights_bit_for_bit():
    unet, text, manager = toy_model()
    layers = BASE_LAYERS[id(unet)]
    originals = [layer.weight.detach().clone() for layer in layers]
    load_all(manager)
    unfused = run_toy(unet, text)
    manager.fuse()
    assert "Lora" not in repr(unet) + repr(text)  # no per-step overhead: plain layers again
    assert max_diff(run_toy(unet, text), unfused) < 1e-5
    manager.set_scale("plain", unet=0.0)  # rescaling while fused refuses from the originals
    manager.set_scale("plain", unet=STRENGTHS["plain"][0])
    assert max_diff(run_toy(unet, text), unfused) < 1e-5
    manager.unfuse()
    assert all(torch.equal(layer.weight, original) for layer, original in zip(layers, originals))
    assert all(torch.equal(a, b) for a, b in zip(run_toy(unet, text), unfused))
    manager.fuse()
    manager.clear()  # removing while fused also gives the originals back
    assert all(torch.equal(layer.weight, original) for layer, original in zip(layers, originals))
    assert "Lora" not in repr(unet) + repr(text)


def test_set_scale_changes_one_lora_per_component():
    unet, text, manager = toy_model()
    load_all(manager)
    manager.set_scale("loha", unet=0.0)
    manager.set_scale("lokr", text_encoder=0.0)
    total = {}
    strengths = {"plain": (0.8, 0.5), "loha": (0.0, 1.0), "lokr": (1.3, 0.0)}
    for name, state_dict in random_lora_files().items():
        for module, delta in file_deltas(state_dict, TOY_SHAPES, *strengths[name]).items():
            total[module] = total.get(module, 0) + delta
    assert max_diff(run_toy(unet, text), hand_toy(unet, text, total)) < 1e-5
    assert manager.scales("lokr") == (1.3, 0.0)


def test_dora_renormalizes_the_adapted_weight():
    unet, text, manager = toy_model()
    g = torch.Generator().manual_seed(3)
    down, up, magnitude = (
        torch.randn(2, 8, generator=g),
        torch.randn(8, 2, generator=g),
        torch.rand(8, 1, generator=g) + 0.5,
    )
    key = f"lora_unet_{ATTN.replace('.', '_')}"
    state_dict = {
        f"{key}.lora_down.weight": down,
        f"{key}.lora_up.weight": up,
        f"{key}.alpha": torch.tensor(1.0),
        f"{key}.dora_scale": magnitude,
    }
    manager.add_loras("dora", state_dict, unet_scale=0.7)
    weight = BASE_LAYERS[id(unet)][1].weight.detach()
    adapted = weight + 0.7 * 0.5 * (up @ down)  # strength 0.7, alpha/rank 0.5
    dora_weight = magnitude * adapted / adapted.norm(dim=1, keepdim=True)
    assert max_diff(run_toy(unet, text), hand_toy(unet, text, {ATTN: dora_weight - weight})) < 1e-5
    manager.fuse()
    assert torch.allclose(BASE_LAYERS[id(unet)][1].weight, dora_weight, atol=1e-6)
    manager.unfuse()
    assert torch.equal(BASE_LAYERS[id(unet)][1].weight, weight)


def test_wrong_family_lora_is_a_clear_error_and_changes_nothing():
    unet, text, manager = toy_model()
    base, trees = run_toy(unet, text), (repr(unet), repr(text))
    sdxl = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 640),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(640, 2),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 2),
    }
    with pytest.raises(
        LoraMismatchError, match=r"'pixel_art_xl.safetensors' targets SDXL \(has lora_te2_.*the model is toy"
    ):
        manager.add_loras("xl", sdxl, source="pixel_art_xl.safetensors")
    # shapes that don't fit are refused layer by layer, and a LoRA of which nothing fits is refused whole
    misfit = {
        f"lora_unet_{ATTN.replace('.', '_')}.lora_down.weight": torch.zeros(2, 640),
        f"lora_unet_{ATTN.replace('.', '_')}.lora_up.weight": torch.zeros(640, 2),
    }
    with pytest.raises(LoraMismatchError, match=r"expected \(2, 8\)"):
        manager.add_loras("misfit", misfit)
    assert manager.names == []
    assert all(torch.equal(a, b) for a, b in zip(run_toy(unet, text), base))
    assert (repr(unet), repr(text)) == trees


def test_partly_fitting_lora_reports_what_was_left_out():
    unet, text, manager = toy_model()
    state_dict = dict(random_lora_files()["plain"])
    state_dict["lora_unet_up_blocks_3_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, 8, 3, 3)
    state_dict["lora_unet_up_blocks_3_resnets_0_conv1.lora_up.weight"] = torch.zeros(8, 2, 1, 1)
    report = manager.add_loras("plain", state_dict)
    assert report.applied_count == 3 and len(report.not_applied) == 2
    assert "up_blocks_3_resnets_0_conv1" in str(report)
    with pytest.raises(ValueError, match="already loaded"):
        manager.add_loras("plain", state_dict)
