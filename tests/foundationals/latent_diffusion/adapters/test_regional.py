"""Regional adapters (a LoRA or an IP-Adapter restricted to a mask) by prediction blending.

Measured on the tiny SD1.5 model (16x16 latents, DDIM 6 steps, guidance 5, a LoRA on every attention
projection and two ResNet convolutions, left half masked): at every step the prediction outside the mask
is the no-LoRA prediction for the same latents exactly (0.0); over the whole trajectory the outside drifts
from the no-LoRA trajectory by 0.30 (vs 2.07 inside), because the base UNet itself mixes the whole latent
once the inside has changed: the tests check that this drift stays well below the effect inside.
With `keep_outside` the outside of the final latents equals the no-adapter run's exactly (DDIM, DPM++ 2M,
Euler ancestral).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from foundationals.clip.image_encoder import load_clip_image_encoder
from foundationals.latent_diffusion.adapters.ip_adapter import IPAdapterPatch, ip_adapter_from_state_dict
from foundationals.latent_diffusion.adapters.lora import SDLoraManager
from foundationals.latent_diffusion.adapters.regional import (
    REGIONS_CONTEXT,
    Region,
    RegionGate,
    latent_region_mask,
    new_region_name,
)
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from nodes.demo import kohya_lora, tencent_ip_adapter, tiny_image_encoder_file, tiny_sd15

LATENT = 16
STEPS = 6
LEFT = (..., slice(0, LATENT // 2))
RIGHT = (..., slice(LATENT // 2, LATENT))


@pytest.fixture(scope="module")
def sd() -> StableDiffusion:
    return tiny_sd15()


@pytest.fixture(scope="module")
def lora(sd) -> dict[str, torch.Tensor]:
    """A strong kohya LoRA on every attention projection and two ResNet convolutions (LoCon)."""
    tensors = kohya_lora(sd, seed=3)
    generator = torch.Generator().manual_seed(9)
    for module in ("down_blocks_0_resnets_0_conv1", "up_blocks_1_resnets_0_conv2"):
        layer = sd.unet.get_submodule(_unet_path(sd, module))
        out_channels, in_channels = layer.weight.shape[:2]
        name = f"lora_unet_{module}"
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, in_channels, 3, 3, generator=generator) * 0.3
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_channels, 2, 1, 1, generator=generator) * 0.3
        tensors[f"{name}.alpha"] = torch.tensor(2.0)
    return {key: value * 5 if key.endswith("up.weight") else value for key, value in tensors.items()}


def _unet_path(sd: StableDiffusion, kohya_module: str) -> str:
    from foundationals.latent_diffusion.adapters.lora import unet_lora_module_map

    for canonical, ours in unet_lora_module_map(sd.unet).items():
        if canonical.replace(".", "_") == kohya_module:
            return ours
    raise KeyError(kohya_module)


def left_half_mask(size: int = 128) -> torch.Tensor:
    mask = torch.zeros(size, size)
    mask[:, : size // 2] = 1.0
    return mask


@dataclass
class RegionalLora:
    """A test `ModelPatch`: the LoRA on the UNet, restricted to `mask` and [start, end)."""

    tensors: dict[str, torch.Tensor]
    mask: torch.Tensor | None
    start: float = 0.0
    end: float = 1.0
    name: str = "style"
    label: str = "regional LoRA"
    keep_outside: bool = False

    def apply(self, model: StableDiffusion, run: SamplingRun | None):
        assert run is not None
        manager = SDLoraManager.for_models(model.unet)
        manager.add_loras(self.name, self.tensors)
        if self.mask is None:
            return manager.clear
        region = Region(
            new_region_name(self.name),
            latent_region_mask(self.mask, run.latent_height, run.latent_width),
            self.start,
            self.end,
            keep_outside=self.keep_outside,
        )
        manager.set_region(self.name, region.name)
        run.regions.append(region)

        def undo() -> None:
            run.regions.remove(region)
            manager.clear()

        return undo


def sample(
    sd: StableDiffusion, patches: list, steps: int = STEPS, callback=None, solver: str = "ddim"
) -> tuple[torch.Tensor, list]:
    """Latents of a tiny txt2img run with `patches`, and the latents after each step."""
    run = SamplingRun(steps, 0, LATENT, LATENT, 1, uses_guidance=True)
    trajectory: list[torch.Tensor] = []

    def record(done: int, total: int, latents: torch.Tensor) -> None:
        trajectory.append(latents.clone())
        if callback is not None:
            callback(done, total, latents)

    schedule = "normal" if solver == "ddim" else "karras"
    chosen = make_solver(solver, steps, schedule, prediction_type=sd.prediction_type)
    positive, negative = sd.encode_prompt("a cat"), sd.encode_prompt("")
    with patched(sd, patches, run):
        latents = sd.sample(
            (1, 4, LATENT, LATENT), positive, negative, chosen, 5.0, 0, callback=record, run=run
        )
    return latents, trajectory


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_regional_lora_first_step_outside_the_mask_is_exactly_the_no_lora_step(sd, lora):
    plain, plain_steps = sample(sd, [])
    regional, regional_steps = sample(sd, [RegionalLora(lora, left_half_mask())])
    full, _ = sample(sd, [RegionalLora(lora, None)])
    # The first step's prediction sees the same latents in both runs: outside the mask it is the base one.
    assert torch.equal(regional_steps[0][RIGHT], plain_steps[0][RIGHT])
    assert max_diff(regional_steps[0][LEFT], plain_steps[0][LEFT]) > 0.1
    # Over the run the outside drifts only through the base model mixing the changed inside (see module doc).
    inside, outside = max_diff(regional[LEFT], plain[LEFT]), max_diff(regional[RIGHT], plain[RIGHT])
    assert inside > 1.0 and outside < 0.25 * inside
    assert max_diff(full[RIGHT], plain[RIGHT]) > 4 * outside  # the unmasked LoRA changes the right half


@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "euler_ancestral"])
def test_regional_lora_keeping_the_outside_ends_exactly_as_without_it(sd, lora, solver):
    """keep_outside: the outside of the final latents is the no-LoRA run's, bit for bit, for any solver
    (multistep and ancestral ones too: both passes draw the plain run's random numbers)."""
    steps = 4
    plain, _ = sample(sd, [], steps=steps, solver=solver)
    progress: list[tuple[int, int]] = []
    kept, _ = sample(
        sd,
        [RegionalLora(lora, left_half_mask(), keep_outside=True)],
        steps=steps,
        solver=solver,
        callback=lambda done, total, x: progress.append((done, total)),
    )
    assert torch.equal(kept[RIGHT], plain[RIGHT])
    assert max_diff(kept[LEFT], plain[LEFT]) > 0.1
    assert progress == [(done, 2 * steps) for done in range(1, 2 * steps + 1)]


def test_every_step_prediction_outside_the_mask_equals_the_base_prediction(sd, lora):
    """Re-run the base UNet on each step's own latents: outside the mask the blended prediction equals it."""
    predictions: list[tuple[torch.Tensor, torch.Tensor]] = []
    patch = RegionalLora(lora, left_half_mask())
    run = SamplingRun(STEPS, 0, LATENT, LATENT, 1, uses_guidance=False)
    with patched(sd, [patch], run), torch.no_grad():
        sd.unet.set_clip_text_embedding(sd.encode_prompt("a cat").text_embedding)
        for step, timestep in enumerate((900, 500, 100)):
            run.run_step_hooks(step)
            sd.unet.set_timestep(torch.tensor([timestep]))
            x = torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(step))
            blended = run.predict(sd.unet, x)
            assert REGIONS_CONTEXT not in sd.unet.provider.contexts  # gates are off between passes
            predictions.append((blended, sd.unet(x)))
    for blended, base in predictions:
        assert torch.equal(blended[RIGHT], base[RIGHT])
        assert max_diff(blended[LEFT], base[LEFT]) > 0.05


def test_region_gate_masks_the_lora_output_at_every_resolution(sd, lora):
    """Inside its own pass a regional LoRA's output is zero outside the mask on each layer's grid."""
    patch = RegionalLora(lora, left_half_mask())
    run = SamplingRun(STEPS, 0, LATENT, LATENT, 1, uses_guidance=False)
    outputs: list[torch.Tensor] = []
    with patched(sd, [patch], run), torch.no_grad():
        gates = list(sd.unet.layers(RegionGate, recurse=True))
        hooks = [gate.register_forward_hook(lambda m, args, out: outputs.append(out)) for gate in gates]
        sd.unet.set_clip_text_embedding(sd.encode_prompt("a cat").text_embedding)
        sd.unet.set_timestep(torch.tensor([500]))
        run.predict(sd.unet, torch.randn(1, 4, LATENT, LATENT, generator=torch.Generator().manual_seed(0)))
        for hook in hooks:
            hook.remove()
    assert len(gates) > 0 and len(outputs) == 2 * len(gates)  # the base pass and the region's pass
    base_pass, region_pass = outputs[: len(gates)], outputs[len(gates) :]
    assert all(output.abs().max().item() == 0.0 for output in base_pass)
    sides, text_side = set(), 0
    for output in region_pass:
        if output.dim() == 3 and output.shape[1] == 77:  # cross-attention keys/values read the text
            text_side += 1
            continue
        grid = output
        if output.dim() == 3:
            side = int(output.shape[1] ** 0.5)
            grid = output.transpose(1, 2).unflatten(2, (side, side))
        side = grid.shape[-1]
        sides.add(side)
        assert grid[..., side // 2 :].abs().max().item() == 0.0
        assert grid[..., : side // 2].abs().max().item() > 0.0
    assert sides == {16, 8, 4}  # every UNet resolution of the tiny model
    assert text_side > 0  # not spatial: unmasked, but only in the region's pass (the blend confines it)


def test_regional_lora_outside_its_window_runs_one_pass_and_equals_no_lora(sd, lora):
    calls: list[int] = []
    hook = sd.unet.register_forward_hook(lambda module, args, output: calls.append(1))
    try:
        plain, plain_steps = sample(sd, [])
        plain_calls = len(calls)
        calls.clear()
        late, late_steps = sample(sd, [RegionalLora(lora, left_half_mask(), start=0.5)])
    finally:
        hook.remove()
    assert plain_calls == STEPS and len(calls) == STEPS + STEPS // 2  # extra passes only in the window
    for step in range(STEPS // 2):
        assert torch.equal(late_steps[step], plain_steps[step])
    assert max_diff(late[LEFT], plain[LEFT]) > 0.1


def test_overlapping_regions_average_and_disjoint_regions_add(sd, lora):
    """Two regions with the same LoRA: full overlap equals one region; the normalizer averages them."""
    everywhere = torch.ones(64, 64)
    one, _ = sample(sd, [RegionalLora(lora, everywhere, name="a")])
    two, _ = sample(sd, [RegionalLora(lora, everywhere, name="a"), RegionalLora(lora, everywhere, name="b")])
    unmasked, _ = sample(sd, [RegionalLora(lora, None)])
    assert max_diff(one, unmasked) < 1e-4  # a full mask is the plain LoRA (blend weight 1 everywhere)
    assert max_diff(two, one) < 1e-4


def test_regional_lora_cannot_be_fused_and_leaves_the_model_unchanged(sd, lora):
    tree, weights = repr(sd.unet), {k: v.clone() for k, v in sd.unet.state_dict().items()}
    manager = SDLoraManager.for_models(sd.unet)
    manager.add_loras("style", lora)
    manager.set_region("style", "r")
    with pytest.raises(ValueError, match="regional LoRAs cannot be fused"):
        manager.fuse()
    manager.clear()
    assert repr(sd.unet) == tree
    assert all(torch.equal(v, weights[k]) for k, v in sd.unet.state_dict().items())


def test_cancel_inside_a_region_pass_leaves_no_region_state(sd, lora):
    switches: list[bool] = []

    class Cancelled(Exception):
        pass

    mask = latent_region_mask(left_half_mask(), LATENT, LATENT)
    region = Region("r", mask, switch=switches.append)
    run = SamplingRun(STEPS, 0, LATENT, LATENT, 1, uses_guidance=False)
    run.regions.append(region)
    calls = []

    def cancel_second_pass(module, args):
        calls.append(1)
        if len(calls) == 2:
            assert sd.unet.provider.get_context(REGIONS_CONTEXT)["active"] == "r"
            raise Cancelled

    hook = sd.unet.register_forward_pre_hook(cancel_second_pass)
    try:
        sd.unet.set_clip_text_embedding(sd.encode_prompt("a cat").text_embedding)
        sd.unet.set_timestep(torch.tensor([500]))
        with pytest.raises(Cancelled), torch.no_grad():
            run.predict(sd.unet, torch.randn(1, 4, LATENT, LATENT))
    finally:
        hook.remove()
    assert switches == [True, False]
    assert REGIONS_CONTEXT not in sd.unet.provider.contexts


def test_latent_region_mask_sizes_and_errors():
    mask = left_half_mask(64)
    latent = latent_region_mask(mask, 8, 8)
    assert latent.shape == (1, 1, 8, 8) and torch.equal(latent[..., :4], torch.ones(1, 1, 8, 4))
    assert torch.equal(latent[..., 4:], torch.zeros(1, 1, 8, 4))
    assert latent_region_mask(torch.ones(2, 30, 50), 8, 8).shape == (2, 1, 8, 8)  # any size, resized
    with pytest.raises(ValueError, match="NaN"):
        latent_region_mask(torch.full((8, 8), float("nan")), 8, 8)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        latent_region_mask(torch.ones(1, 3, 8, 8), 8, 8)
    with pytest.raises(ValueError, match="start/end"):
        Region("r", latent, start=0.8, end=0.2)


@pytest.fixture(scope="module")
def ip_adapter(sd):
    adapter = ip_adapter_from_state_dict(tencent_ip_adapter(sd), name="ip-adapter_sd15")
    encoder = load_clip_image_encoder(tiny_image_encoder_file())
    images = torch.rand(1, 40, 48, 3, generator=torch.Generator().manual_seed(2))
    return adapter, adapter.encode_images(encoder, images)


def test_masked_ip_adapter_first_step_outside_the_mask_is_exactly_the_no_adapter_step(sd, ip_adapter):
    adapter, embeddings = ip_adapter
    plain, plain_steps = sample(sd, [])
    masked, masked_steps = sample(sd, [IPAdapterPatch(adapter, embeddings, scale=2.0, mask=left_half_mask())])
    full, _ = sample(sd, [IPAdapterPatch(adapter, embeddings, scale=2.0)])
    assert torch.equal(masked_steps[0][RIGHT], plain_steps[0][RIGHT])
    assert max_diff(masked_steps[0][LEFT], plain_steps[0][LEFT]) > 1e-3
    inside, outside = max_diff(masked[LEFT], plain[LEFT]), max_diff(masked[RIGHT], plain[RIGHT])
    assert outside < 0.25 * inside
    assert max_diff(full[RIGHT], plain[RIGHT]) > 2 * outside


def test_masked_ip_adapter_outside_its_window_equals_no_adapter(sd, ip_adapter):
    adapter, embeddings = ip_adapter
    plain, plain_steps = sample(sd, [])
    _, late_steps = sample(
        sd, [IPAdapterPatch(adapter, embeddings, scale=2.0, mask=left_half_mask(), start=0.5)]
    )
    for step in range(STEPS // 2):
        assert torch.equal(late_steps[step], plain_steps[step])
    assert max_diff(late_steps[-1], plain_steps[-1]) > 1e-4


def test_masked_ip_adapter_keeping_the_outside_ends_exactly_as_without_it(sd, ip_adapter):
    adapter, embeddings = ip_adapter
    plain, _ = sample(sd, [], steps=4)
    patch = IPAdapterPatch(adapter, embeddings, scale=2.0, mask=left_half_mask(), keep_outside=True)
    kept, _ = sample(sd, [patch], steps=4)
    assert torch.equal(kept[RIGHT], plain[RIGHT])
    assert max_diff(kept[LEFT], plain[LEFT]) > 1e-3
