"""Applying LoRAs: stacking with strengths, fuse/unfuse bit-exactness, clear wrong-family errors, diffusers parity."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import fluxion.layers as fl
from fluxion.adapters.lora import LoraAdapter
from foundationals.formats.lora import TEXT_ENCODER, UNET, LoraNamespace, UNetLayout, normalize_lora
from foundationals.latent_diffusion.adapters.lora import LoraMismatchError, SDLoraManager
from tests.support.parity import assert_parity

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


# -- Parity with diffusers' load_lora_weights + set_adapters on the tiny SD1.5 models --------------------


def tiny_sd15_pair():
    """diffusers/transformers tiny SD1.5 UNet + CLIP, and ours with the same (random) weights."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from foundationals.clip.config import CLIPTextConfig
    from foundationals.clip.text_encoder import load_clip_text_encoder
    from foundationals.formats.diffusers import diffusers_unet_key_map
    from foundationals.latent_diffusion.model_config import TINY_UNET
    from foundationals.latent_diffusion.unet import UNet

    torch.manual_seed(0)
    reference_unet = diffusers.UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,
        norm_num_groups=32,
    ).eval()
    for parameter in reference_unet.parameters():  # diffusers zero-inits some layers: make every weight count
        parameter.data.normal_(0, 0.05 if parameter.dim() > 1 else 0.1)
    unet = UNet(TINY_UNET, device="meta")
    state = reference_unet.state_dict()
    unet.load_state_dict(
        {ours: state[theirs] for theirs, ours in diffusers_unet_key_map(unet).items()}, assign=True
    )
    text_config = transformers.CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=100
    )
    reference_text = transformers.CLIPTextModel(text_config).eval()
    text = load_clip_text_encoder(
        reference_text.state_dict(),
        "transformers",
        config=CLIPTextConfig(
            embedding_dim=32, num_layers=2, num_heads=4, feedforward_dim=37, vocabulary_size=100
        ),
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4),
        text_encoder=reference_text,
        tokenizer=None,
        unet=reference_unet,
        scheduler=diffusers.DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe, unet, text


def write_loras(pipe, folder):
    """A peft file written by diffusers' `save_lora_weights`, and a kohya file by sd-scripts' naming rule."""
    import diffusers
    import peft
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    unet_targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "time_emb_proj"]
    text_targets = ["q_proj", "v_proj", "out_proj", "fc1"]
    g = torch.Generator().manual_seed(7)
    layers = {}
    for component, targets, rank, alpha in (
        (UNET, unet_targets, 4, 8.0),
        (TEXT_ENCODER, text_targets, 2, 1.0),
    ):
        model = getattr(pipe, component)
        model.add_adapter(
            peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets), adapter_name="trained"
        )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)
        layers[component] = {
            name: module
            for name, module in model.named_modules()
            if hasattr(module, "lora_A") and "trained" in module.lora_A
        }
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(folder),
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="trained"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="trained"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["trained"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["trained"].to_dict(),
        weight_name="peft.safetensors",
    )
    kohya = {}
    for component, prefix in ((UNET, "lora_unet"), (TEXT_ENCODER, "lora_te")):
        for name, module in layers[component].items():
            key = f"{prefix}_{name.replace('.', '_')}"
            kohya[f"{key}.lora_down.weight"] = (
                torch.randn(module.lora_A["trained"].weight.shape, generator=g) * 0.2
            )
            kohya[f"{key}.lora_up.weight"] = (
                torch.randn(module.lora_B["trained"].weight.shape, generator=g) * 0.2
            )
            kohya[f"{key}.alpha"] = torch.tensor(3.0)
    save_file(kohya, folder / "kohya.safetensors")
    pipe.delete_adapters("trained")


def run_pair(pipe, unet, text):
    g = torch.Generator().manual_seed(1)
    x, t, context = (
        torch.randn(2, 4, 16, 16, generator=g),
        torch.tensor([999.0, 3.5]),
        torch.randn(2, 7, 32, generator=g),
    )
    tokens = torch.randint(0, 100, (2, 9), generator=g)
    with torch.no_grad():
        expected = pipe.unet(x, t, context).sample, pipe.text_encoder(tokens).last_hidden_state
        unet.set_timestep(t)
        unet.set_clip_text_embedding(context)
        actual = unet(x), text(tokens)
    return expected, actual


def test_kohya_and_peft_files_match_diffusers_load_lora_weights_and_set_adapters(tmp_path):
    pipe, unet, text = tiny_sd15_pair()
    write_loras(pipe, tmp_path)
    (base_expected, base_actual) = run_pair(pipe, unet, text)
    assert_parity("lora", base_actual, base_expected)

    pipe.load_lora_weights(str(tmp_path), weight_name="peft.safetensors", adapter_name="peft")
    pipe.load_lora_weights(str(tmp_path), weight_name="kohya.safetensors", adapter_name="kohya")
    pipe.set_adapters(["peft", "kohya"], adapter_weights=[0.7, -0.4])
    manager = SDLoraManager.for_models(unet, text)
    for name, strength in (("peft", 0.7), ("kohya", -0.4)):
        report = manager.add_loras(
            name, tmp_path / f"{name}.safetensors", unet_scale=strength, text_encoder_scale=strength
        )
        assert report.not_applied == [] and report.applied_count > 50
    expected, actual = run_pair(pipe, unet, text)
    assert max_diff(expected, base_expected) > 1e-2  # the LoRAs do change the outputs
    assert_parity("lora", actual, expected)

    manager.fuse()
    assert max_diff(run_pair(pipe, unet, text)[1], actual) < 1e-4
    manager.unfuse()
    manager.clear()
    assert all(torch.equal(a, b) for a, b in zip(run_pair(pipe, unet, text)[1], base_actual))


def test_sdxl_lora_on_sd15_model_names_both_and_leaves_the_model_unchanged():
    _, unet, text = tiny_sd15_pair()
    manager = SDLoraManager.for_models(unet, text)
    tree = repr(unet)
    sdxl = {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 2),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight": torch.zeros(2, 2048),
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(640, 2),
    }
    with pytest.raises(
        LoraMismatchError, match=r"'xl.safetensors' targets SDXL \(has lora_te2_.*the model is SD1.5"
    ):
        manager.add_loras("xl", sdxl, source="xl.safetensors")
    assert repr(unet) == tree and manager.names == []


def test_scheduled_lora_acts_only_within_its_fraction_of_sampling():
    from foundationals.latent_diffusion.adapters.lora import set_lora_progress

    unet, text, manager = toy_model()
    base = run_toy(unet, text)
    load_all(manager)
    full = run_toy(unet, text)
    for name in manager.names:
        manager.set_schedule(name, start=0.25, end=0.75)
    with pytest.raises(ValueError, match="cannot be fused"):
        manager.fuse()
    for progress, expected in ((0.1, base), (0.5, full), (0.75, base), (None, full)):
        set_lora_progress(unet, progress)
        set_lora_progress(text, progress)
        assert max_diff(run_toy(unet, text), expected) < 1e-6, progress
    for name in manager.names:
        manager.set_schedule(name)  # the whole run again: fusable
    set_lora_progress(unet, 0.9)
    manager.fuse()
    assert max_diff(run_toy(unet, text), full) < 1e-5


def test_a_second_manager_finds_the_same_layers_after_a_first_injected_unfused_loras():
    """Injecting an adapter renames its siblings (`Linear_1` → `LoraAdapter`, `Linear_2` → `Linear_1`):
    a second, unfused stack must still put a to_k LoRA on to_k, not on the layer now called `Linear_1`."""
    from nodes.demo import tiny_sd15

    sd = tiny_sd15()
    tree = repr(sd.unet)
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    first, second = SDLoraManager.for_models(sd.unet), SDLoraManager.for_models(sd.unet)
    to_k = second.targets[UNET][k]
    width = to_k.weight.shape[1]
    g = torch.Generator().manual_seed(0)

    def lora(module):
        name = "lora_unet_" + module.replace(".", "_")
        return {
            f"{name}.lora_down.weight": torch.randn(2, width, generator=g),
            f"{name}.lora_up.weight": torch.randn(width, 2, generator=g),
        }

    first.add_loras("q", lora(q))
    late = SDLoraManager.for_models(sd.unet)  # built on the adapted tree
    assert late.targets[UNET][k] is to_k and late.targets[UNET][q] is first.targets[UNET][q]
    report = late.add_loras("k", lora(k))
    assert report.applied == [f"{UNET}:{k}"]
    adapters = {adapter.target: adapter.names for adapter in sd.unet.layers(LoraAdapter, recurse=True)}
    assert adapters[to_k] == ["k"] and adapters[first.targets[UNET][q]] == ["q"]
    late.clear()
    first.clear()
    assert repr(sd.unet) == tree


def test_fused_weights_keep_their_originals_on_the_backup_device_and_add_float32_deltas_once():
    from nodes.demo import kohya_lora, tiny_sd15

    model = tiny_sd15()
    unet = model.unet.to(dtype=torch.float16)  # fp16 weights, as on a GPU
    before = {name: weight.clone() for name, weight in unet.state_dict().items()}
    files = kohya_lora(model), kohya_lora(model, seed=5)  # read the layers' shapes before any injection
    manager = SDLoraManager.for_models(unet, backup_device="cpu")
    manager.add_loras("style", files[0], unet_scale=0.8)
    manager.add_loras("other", files[1], unet_scale=-0.5)
    manager.fuse()
    sites = list(manager._sites.values())
    assert sites
    for site in sites:
        weight, original = site.layer.weight, site.original
        assert original.device == manager.backup_device and original.dtype == weight.dtype
        assert original.data_ptr() != weight.data_ptr()  # a copy of its own, off the layer
        delta = sum(
            lora.delta_weight(torch.float32).reshape(weight.shape) for lora in site.adapter.iter_loras()
        )
        assert torch.equal(weight, (original.float() + delta).to(torch.float16))  # rounded once, same ops
    manager.unfuse()
    manager.clear()
    assert all(torch.equal(unet.state_dict()[name], weight) for name, weight in before.items())  # bit for bit
