"""The host-free half of "Fluxion To Core Model" (nodes/core_models.py), with small fakes instead of ComfyUI.

What core's samplers hand a diffusion model (chunks in `cond_or_uncond` order, `control` lists popped from
the end, the schedule in `sample_sigmas`) is written here by hand from comfy/samplers.py and
comfy/ldm/modules/diffusionmodules/openaimodel.py. Outputs are compared with our UNet called directly in our
own layout: same weights, same float path per chunk, so 1e-6 (max abs) covers batching differences.
"""

import math

import pytest
import torch

from fluxion import layers as fl
from foundationals.latent_diffusion.model_config import TINY_SDXL_UNET, TINY_UNET
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from foundationals.latent_diffusion.unet import UNet
from nodes.core_models import (
    COND,
    UNCOND,
    FluxionDiffusionModel,
    control_residuals,
    plan_batch,
    sampling_run,
    step_index,
)

TOLERANCE = 1e-6


def _model(config=TINY_UNET, seed=0) -> StableDiffusion:
    torch.manual_seed(seed)
    unet = UNet(config)
    for parameter in unet.parameters():
        parameter.data.normal_(0, 0.05)
    return StableDiffusion(unet=unet, autoencoder=None, text_encoder=None)  # type: ignore[arg-type]


class TextRecorder(fl.ContextModule):
    """Records the text embedding batch each UNet call sees."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def forward(self, x):
        self.seen.append(self.use_context("cross_attention_block")["clip_text_embedding"].clone())
        return x


class RecordingPatch:
    label = "recorder"

    def __init__(self) -> None:
        self.seen: list = []
        self.steps: list[int] = []
        self.applied = 0

    def apply(self, model, run):
        layer = TextRecorder(self.seen)
        model.unet.insert(0, layer)
        self.applied += 1
        hook = self.steps.append
        run.on_step(hook)

        def undo():
            model.unet.remove(layer)
            run.step_hooks.remove(hook)
            self.applied -= 1

        return undo


def _direct(unet: UNet, x, t, text, residuals=None):
    unet.set_timestep(t)
    unet.set_clip_text_embedding(text)
    unet.set_control_residuals(residuals)
    try:
        return unet(x)
    finally:
        unet.set_control_residuals(None)


def test_step_index_from_the_schedule():
    sigmas = torch.tensor([14.6, 10.0, 5.0, 1.0, 0.0])
    assert [step_index(sigmas, s, 4) for s in (14.6, 10.0, 5.0, 1.0)] == [0, 1, 2, 3]
    assert step_index(sigmas, 12.0, 4) == 0  # a solver's intermediate evaluation inside step 0
    assert step_index(sigmas, torch.tensor([7.0, 7.0]), 4) == 1
    assert step_index(sigmas, 0.0, 4) == 3  # clamped to the last step
    assert step_index(None, 3.0, 4) == 0


def test_plan_batch_puts_chunks_in_our_negative_positive_layout():
    assert plan_batch([UNCOND, COND], True).calls == ((0, 1),)
    reordered = plan_batch([COND, UNCOND], True)
    assert reordered.calls == ((1, 0),) and reordered.sources == ((0, 1), (0, 0))
    alone = plan_batch([COND], True)
    assert alone.calls == ((0, 0),) and alone.sources == ((0, 1),)  # the missing half is a duplicate
    three = plan_batch([COND, COND, UNCOND], True)
    assert three.calls == ((2, 0), (1, 1)) and three.sources == ((0, 1), (1, 1), (0, 0))
    assert plan_batch([COND, COND], False).calls == ((0,), (1,))


def test_control_residuals_follow_cores_pop_order():
    skips = 7
    outputs = [torch.full((1,), float(i)) for i in range(skips)]
    residuals = control_residuals({"output": outputs, "middle": [torch.full((1,), 99.0)]}, skips)
    assert [float(r) for r in residuals] == [*range(skips), 99.0]
    shorter = control_residuals({"output": [torch.ones(1), None]}, skips)  # aligned from the last skip
    assert [float(r) for r in shorter] == [0.0] * (skips - 2) + [1.0, 0.0, 0.0]
    assert control_residuals(None, skips) == [0.0] * (skips + 1)
    with pytest.raises(ValueError, match="T2I"):
        control_residuals({"input": [torch.ones(1)]}, skips)
    with pytest.raises(ValueError, match="another model family"):
        control_residuals({"output": outputs + outputs}, skips)


def test_forward_reorders_chunks_and_maps_control_onto_our_layout():
    model = _model()
    unet = model.unet
    patch = RecordingPatch()
    diffusion = FluxionDiffusionModel(model, (patch,), "tiny")
    torch.manual_seed(1)
    x = torch.randn(2, 4, 8, 8)
    positive, negative = torch.randn(1, 5, TINY_UNET.context_dim), torch.randn(1, 5, TINY_UNET.context_dim)
    t = torch.tensor([500.0, 500.0])
    # core's order here: positive chunk first; its control tensors are batched the same way
    with torch.no_grad():
        probe = _direct(unet, x, t, torch.cat([positive, negative]))
    shapes = [r.shape for r in _skip_shapes(unet, x, t, torch.cat([positive, negative]))]
    torch.manual_seed(2)
    outputs = [torch.randn(s) * 0.1 for s in shapes]
    middle = torch.randn(probe.shape[0], *_middle_shape(unet, x, t, torch.cat([positive, negative]))) * 0.1
    control = {"output": list(outputs), "middle": [middle]}
    sigmas = torch.tensor([14.6, 7.0, 0.0])
    options = {"cond_or_uncond": [COND, UNCOND], "sample_sigmas": sigmas, "sigmas": torch.tensor([7.0, 7.0])}
    run = sampling_run((1, 4, 8, 8), 2, uses_guidance=True)
    with torch.no_grad(), diffusion.sampling(run, sigmas):
        assert patch.applied == 1
        actual = diffusion(
            x, t, torch.cat([positive, negative]), control=control, transformer_options=options
        )
    assert patch.applied == 0 and not any(isinstance(m, TextRecorder) for m in unet)  # undone after the run
    # our layout: [negative, positive]
    assert torch.equal(patch.seen[0], torch.cat([negative, positive]))
    assert patch.steps == [1]
    swap = [r.flip(0) for r in outputs] + [middle.flip(0)]
    with torch.no_grad():
        expected = _direct(unet, x.flip(0), t, torch.cat([negative, positive]), swap).flip(0)
    assert (actual - expected).abs().max() < TOLERANCE


def _skip_shapes(unet, x, t, text):
    from foundationals.latent_diffusion.unet import ResidualAccumulator

    shapes = []
    handles = [
        m.register_forward_hook(lambda mod, args, out: shapes.append(args[0]))
        for m in unet.modules()
        if isinstance(m, ResidualAccumulator)
    ]
    try:
        with torch.no_grad():
            _direct(unet, x, t, text)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def _middle_shape(unet, x, t, text):
    from foundationals.latent_diffusion.unet import MiddleBlock

    found = []
    handle = unet.ensure_find(MiddleBlock).register_forward_hook(
        lambda m, a, out: found.append(out.shape[1:])
    )
    try:
        with torch.no_grad():
            _direct(unet, x, t, text)
    finally:
        handle.remove()
    return found[0]


def test_a_lone_positive_chunk_gets_a_duplicate_negative_half():
    model = _model()
    patch = RecordingPatch()
    diffusion = FluxionDiffusionModel(model, (patch,))
    x = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 5, TINY_UNET.context_dim)
    t = torch.tensor([300.0])
    run = sampling_run(x.shape, 3, uses_guidance=True)
    with torch.no_grad(), diffusion.sampling(run):
        actual = diffusion(x, t, text, transformer_options={"cond_or_uncond": [COND]})
        expected = _direct(model.unet, x, t, text)
    assert patch.seen[0].shape[0] == 2  # the patch saw our [negative, positive] layout
    assert (actual - expected).abs().max() < TOLERANCE


def test_outside_a_sampling_run_the_stack_is_applied_for_the_call_and_undone():
    model = _model()
    patch = RecordingPatch()
    diffusion = FluxionDiffusionModel(model, (patch,))
    x, text, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, TINY_UNET.context_dim), torch.tensor([10.0])
    with torch.no_grad():
        diffusion(x, t, text, transformer_options={"cond_or_uncond": [COND]})
    assert len(patch.seen) == 1 and patch.applied == 0


def test_the_stack_is_undone_when_sampling_fails():
    model = _model()
    patch = RecordingPatch()
    diffusion = FluxionDiffusionModel(model, (patch,))
    with pytest.raises(KeyboardInterrupt), diffusion.sampling(sampling_run((1, 4, 8, 8), 2, True)):
        raise KeyboardInterrupt
    assert patch.applied == 0 and diffusion._run is None
    assert not any(isinstance(m, TextRecorder) for m in model.unet)


def _comfy_timestep_embedding(values: torch.Tensor, dim: int) -> torch.Tensor:
    """comfy.ldm.modules.diffusionmodules.util.timestep_embedding (cos first, then sin), written out."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    angles = values[:, None].float() * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def test_sdxl_takes_cores_y_and_matches_our_pooled_and_time_ids():
    config = TINY_SDXL_UNET
    model = _model(config)
    unet = model.unet
    diffusion = FluxionDiffusionModel(model, ())
    torch.manual_seed(3)
    x = torch.randn(2, 4, 8, 8)
    text = torch.randn(2, 5, config.context_dim)
    pooled = torch.randn(2, config.pooled_text_dim)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [32.0, 48.0, 8.0, 4.0, 64.0, 64.0]])
    flat = [_comfy_timestep_embedding(row, config.time_id_embedding_dim).flatten() for row in time_ids]
    y = torch.cat([pooled, torch.stack(flat)], dim=1)  # comfy.model_base.SDXL.encode_adm's layout
    t = torch.tensor([700.0, 700.0])
    run = sampling_run((1, 4, 8, 8), 1, uses_guidance=True)
    with torch.no_grad(), diffusion.sampling(run):
        actual = diffusion(x, t, text, y=y, transformer_options={"cond_or_uncond": [UNCOND, COND]})
    with torch.no_grad():
        unet.set_pooled_text_embedding(pooled)
        unet.set_time_ids(time_ids)
        expected = _direct(unet, x, t, text)
    assert (actual - expected).abs().max() < 1e-5
