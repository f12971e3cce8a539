"""LoRA nodes: the stack equals chained loaders, regional and scheduled LoRAs act only where and when asked."""

import pytest
import torch

from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.solvers import make_solver
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.core_types import conditioning_entries
from nodes.demo import DEMO_LOCON, DEMO_LORA, DEMO_LORA_2, SD15_CHECKPOINT, write_demo_files
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionLoraLoader, FluxionLoraStack, FluxionRegionalLora
from nodes.sampler_nodes import FluxionSampler
from nodes.text_nodes import FluxionTextEncode

SIZE = dict(width=1024, height=1024, crop_w=0, crop_h=0, target_width=1024, target_height=1024)
THREE = [(DEMO_LORA, 0.8, 1.0), (DEMO_LORA_2, -0.5, 0.5), (DEMO_LOCON, 0.6, 0.0)]
LATENT = 8  # 64 px


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def loaded(demo_folders, monkeypatch):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    monkeypatch.setattr(host, "_input_dir", demo_folders / "input")
    return FluxionCheckpointLoader().load(SD15_CHECKPOINT)


def stack_inputs(loras, fuse=True):
    inputs = {}
    for slot in range(1, 5):
        name, unet, clip = loras[slot - 1] if slot <= len(loras) else ("None", 1.0, 1.0)
        inputs.update({f"lora_{slot}": name, f"strength_model_{slot}": unet, f"strength_clip_{slot}": clip})
    return dict(inputs, fuse=fuse)


def generate(model, clip, seed=5, steps=3):
    encode = FluxionTextEncode().encode
    positive, negative = encode(clip, "a castle", 1, **SIZE)[0], encode(clip, "fog", 1, **SIZE)[0]
    latent = FluxionEmptyLatent().generate(LATENT * 8, LATENT * 8, 1)[0]
    return FluxionSampler().sample(
        model, positive, negative, latent, seed, steps, 6.0, "ddim", "normal", 1.0
    )[0]["samples"]


def trajectory(model, clip, steps=6):
    """The latents after each step of a DDIM run with the model wire's patch stack."""
    sd = model.model
    encode = FluxionTextEncode().encode
    positive, negative = (
        conditioning_entries(encode(clip, text, 1, **SIZE)[0], "prompt", False, LATENT * 8, LATENT * 8)
        for text in ("a castle", "fog")
    )
    run = SamplingRun(steps, 0, LATENT, LATENT, 1, uses_guidance=True)
    latents: list[torch.Tensor] = []
    solver = make_solver("ddim", steps, "normal", prediction_type=sd.prediction_type)
    with patched(sd, model.patches, run):
        sd.sample(
            (1, 4, LATENT, LATENT),
            positive,
            negative,
            solver,
            6.0,
            0,
            callback=lambda done, total, x: latents.append(x.clone()),
            run=run,
        )
    return latents


def test_lora_stack_equals_the_same_loaders_chained(loaded):
    model, clip, _ = loaded
    stacked_model, stacked_clip, report = FluxionLoraStack().load(model, clip, **stack_inputs(THREE))
    chained_model, chained_clip = model, clip
    for name, unet, text in THREE:
        chained_model, chained_clip, _ = FluxionLoraLoader().load(
            chained_model, chained_clip, name, unet, text
        )
    assert [patch.label for patch in stacked_model.patches] == [
        patch.label for patch in chained_model.patches
    ]
    assert torch.equal(generate(stacked_model, stacked_clip), generate(chained_model, chained_clip))
    assert report.count("layers applied") == 3
    assert len(model.patches) == 0 and len(clip.patches) == 0  # the inputs are untouched


def test_three_fused_loras_equal_the_same_three_unfused(loaded):
    """Fused: the deltas are summed into the weights; unfused: each LoRA adds its own path."""
    model, clip, _ = loaded
    plain = generate(model, clip)
    fused = generate(*FluxionLoraStack().load(model, clip, **stack_inputs(THREE, fuse=True))[:2])
    unfused = generate(*FluxionLoraStack().load(model, clip, **stack_inputs(THREE, fuse=False))[:2])
    assert (fused - unfused).abs().max().item() < 6e-4  # unscaled latents: 1e-4 on the scaled ones / 0.18215
    assert (fused - plain).abs().max().item() > 1e-2
    assert torch.equal(generate(model, clip), plain)  # every weight restored after both runs


def test_lora_stack_skips_empty_slots_and_refuses_one_file_twice(loaded):
    model, clip, _ = loaded
    same_model, same_clip, report = FluxionLoraStack().load(model, clip, **stack_inputs([]))
    assert same_model.patches == () and same_clip.patches == () and report == "no LoRA chosen"
    with pytest.raises(ValueError, match="same LoRA is in two slots"):
        FluxionLoraStack().load(model, clip, **stack_inputs([(DEMO_LORA, 1.0, 1.0), (DEMO_LORA, 0.5, 0.5)]))


def test_regional_lora_node_first_step_is_exact_outside_the_mask(loaded):
    model, clip, _ = loaded
    tree = repr(model.model.unet)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # the left half, at pixel size
    given = mask.clone()
    regional, report = FluxionRegionalLora().load(model, DEMO_LORA, 2.0, 0.0, 1.0, "blend", mask)
    assert "layers applied" in report and torch.equal(mask, given)
    assert "masked" in regional.patches[-1].label
    plain, masked = trajectory(model, clip), trajectory(regional, clip)
    right, left = (..., slice(LATENT // 2, None)), (..., slice(0, LATENT // 2))
    assert torch.equal(masked[0][right], plain[0][right])
    assert (masked[0][left] - plain[0][left]).abs().max().item() > 1e-3
    assert repr(model.model.unet) == tree  # the regional LoRA and its gates are gone after the run


def test_scheduled_lora_node_leaves_steps_outside_its_window_as_without_it(loaded):
    model, clip, _ = loaded
    late, _ = FluxionRegionalLora().load(model, DEMO_LORA, 2.0, 0.5, 1.0)
    early, _ = FluxionRegionalLora().load(model, DEMO_LORA, 2.0, 0.0, 0.5)
    assert "steps 0.5-1" in late.patches[-1].label
    plain, late_steps, early_steps = trajectory(model, clip), trajectory(late, clip), trajectory(early, clip)
    for step in range(3):  # progress 0, 1/6, 2/6: before the window
        assert torch.equal(late_steps[step], plain[step])
    assert (late_steps[3] - plain[3]).abs().max().item() > 1e-4
    assert (early_steps[0] - plain[0]).abs().max().item() > 1e-4
    weights = {key: value.clone() for key, value in model.model.unet.state_dict().items()}
    trajectory(late, clip)
    assert all(torch.equal(value, weights[key]) for key, value in model.model.unet.state_dict().items())
    assert "lora_schedule" not in model.model.unet.provider.contexts


def test_regional_lora_node_refuses_bad_windows_and_masks(loaded):
    model, _, _ = loaded
    with pytest.raises(ValueError, match="start .* must not be after end"):
        FluxionRegionalLora().load(model, DEMO_LORA, 1.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="NaN"):
        FluxionRegionalLora().load(
            model, DEMO_LORA, 1.0, 0.0, 1.0, "blend", torch.full((1, 8, 8), float("nan"))
        )
    with pytest.raises(ValueError, match="outside_mask must be one of"):
        FluxionRegionalLora().load(model, DEMO_LORA, 1.0, 0.0, 1.0, "crop")


def test_regional_lora_node_keeping_the_outside_ends_exactly_as_without_it(loaded):
    model, clip, _ = loaded
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    kept, _ = FluxionRegionalLora().load(model, DEMO_LORA, 2.0, 0.0, 1.0, "keep", mask)
    assert "outside kept" in kept.patches[-1].label
    plain, result = generate(model, clip, steps=3), generate(kept, clip, steps=3)
    right, left = (..., slice(LATENT // 2, None)), (..., slice(0, LATENT // 2))
    assert torch.equal(result[right], plain[right])
    assert (result[left] - plain[left]).abs().max().item() > 1e-3
