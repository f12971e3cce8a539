"""The guidance machinery on small inputs: batch halves, the stack's order, FreeU's blocks and math, rescaling.

Hand-checkable cases; the whole-pipeline parity with diffusers is in adapters/test_guidance*.py.
"""

from __future__ import annotations

import pytest
import torch

import fluxion.layers as fl
from foundationals.latent_diffusion.adapters.guidance import freeu_factors, rescale_to
from foundationals.latent_diffusion.adapters.guidance.cfg import RescaleCFGHook
from foundationals.latent_diffusion.adapters.guidance.freeu import (
    backbone_widths,
    fourier_filter,
    scale_backbone,
)
from foundationals.latent_diffusion.adapters.guidance.layers import named_self_attention_blocks
from foundationals.latent_diffusion.adapters.reference_only import ReferenceAttention
from foundationals.latent_diffusion.guidance import (
    COMBINE,
    NEGATIVE,
    POSITIVE,
    RESCALE,
    TERMS,
    GuidanceHook,
    GuidanceStack,
    GuidanceStep,
    alpha_bar_at,
    select_halves,
)
from foundationals.latent_diffusion.model_config import UNET_PRESETS
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.unet import UNet


def test_select_halves_picks_rows_and_refuses_what_is_not_there():
    batch = torch.arange(6.0)[:, None]  # [negative 0..2, positive 3..5]
    both = (NEGATIVE, POSITIVE)
    assert select_halves(batch, both, both) is batch
    assert select_halves(batch, both, (POSITIVE,)).flatten().tolist() == [3, 4, 5]
    assert select_halves(batch, both, (NEGATIVE,)).flatten().tolist() == [0, 1, 2]
    assert select_halves(batch, both, (POSITIVE, NEGATIVE)).flatten().tolist() == [3, 4, 5, 0, 1, 2]
    with pytest.raises(ValueError, match="negative half"):
        select_halves(batch[3:], (POSITIVE,), (NEGATIVE,))


def test_alpha_bar_reads_integer_timesteps_and_inverts_fractional_ones():
    solver = make_solver("dpmpp_2m", 10, "karras")
    table = solver.alphas_cumprod
    assert alpha_bar_at(table, torch.tensor(999.0)) == table[999]
    sigmas = ((1 - table) / table) ** 0.5
    for step in range(10):  # each Karras timestep back to its sigma
        timestep = solver.timesteps[step]
        alpha = alpha_bar_at(table, timestep)
        low = int(timestep)
        assert sigmas[low] <= ((1 - alpha) / alpha) ** 0.5 <= sigmas[min(low + 1, 999)] * (1 + 1e-6)


class Recorder(GuidanceHook):
    def __init__(self, name: str, phase: int, log: list[str], negative: bool = True) -> None:
        self.name, self.phase, self.log, self.negative = name, phase, log, negative

    def uses_negative(self, step: GuidanceStep) -> bool:
        return self.negative

    def adjust(self, step, unconditional, conditional, prediction):  # noqa: ANN001, ANN201
        self.log.append(f"{self.name}:{'cfg' if unconditional is not None else 'positive'}")
        return prediction + 1


class FakePasses:
    has_negative = True

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def both(self, x):  # noqa: ANN001, ANN201
        self.log.append("both")
        return x, 2 * x

    def one(self, x, half):  # noqa: ANN001, ANN201
        self.log.append(half)
        return 3 * x


def step(passes: FakePasses, scale: float = 2.0) -> GuidanceStep:
    table = make_solver("ddim", 4).alphas_cumprod
    return GuidanceStep(0, 4, torch.tensor(500.0), torch.ones(1, 4, 2, 2), scale, table, "epsilon", passes)


def test_the_stack_runs_phases_in_order_and_stack_order_within_a_phase():
    log: list[str] = []
    announced: list[tuple[str, ...]] = []
    hooks = [
        Recorder("rescale", RESCALE, log),
        Recorder("pag", TERMS, log),
        Recorder("combine", COMBINE, log),
    ]
    hooks.append(Recorder("sag", TERMS, log))
    stack = GuidanceStack(hooks, announced.append)
    result = stack.predict(step(FakePasses(log)))
    assert log == ["both", "combine:cfg", "pag:cfg", "sag:cfg", "rescale:cfg"]
    assert torch.equal(result, torch.full((1, 4, 2, 2), 1 + 2.0 * (2 - 1) + 4))  # cfg of (1, 2) + 4 hooks
    assert announced == [
        (NEGATIVE, POSITIVE),
        (NEGATIVE, POSITIVE),
    ]  # the pass, then back to the stored layout


def test_one_hook_refusing_the_negative_half_makes_the_step_positive_only():
    log: list[str] = []
    announced: list[tuple[str, ...]] = []
    stack = GuidanceStack([Recorder("cutoff", TERMS, log, negative=False)], announced.append)
    result = stack.predict(step(FakePasses(log)))
    assert log == [POSITIVE, "cutoff:positive"] and torch.equal(result, torch.full((1, 4, 2, 2), 4.0))
    assert announced == [(POSITIVE,), (NEGATIVE, POSITIVE)]


def test_freeu_blocks_by_channels_follow_the_freeu_authors_and_by_up_blocks_follow_diffusers():
    sd15 = UNET_PRESETS["sd15"]
    assert backbone_widths(sd15) == [1280] * 7 + [640] * 3 + [320] * 2
    stages = freeu_factors(sd15, (1.1, 1.2), (0.9, 0.2), "channels")
    assert stages == [(1.1, 0.9)] * 7 + [(1.2, 0.2)] * 3 + [None] * 2
    assert (
        freeu_factors(sd15, (1.1, 1.2), (0.9, 0.2), "up_blocks")
        == [(1.1, 0.9)] * 3 + [(1.2, 0.2)] * 3 + [None] * 6
    )
    sdxl = UNET_PRESETS["sdxl_base"]  # levels 320, 640, 1280
    assert (
        freeu_factors(sdxl, (1.1, 1.2), (0.9, 0.2), "channels")
        == [(1.1, 0.9)] * 4 + [(1.2, 0.2)] * 3 + [None] * 2
    )


def test_freeu_backbone_scaling_and_fourier_filter_by_hand():
    h = torch.tensor([[[[1.0, 3.0]], [[5.0, 7.0]]]])  # (1, 2 channels, 1, 2)
    assert scale_backbone(h, 2.0, 1).flatten().tolist() == [2.0, 6.0, 5.0, 7.0]
    # v2: the channel mean (3, 5) normalized to (0, 1) over the positions weighs the factor: 1 and 2
    assert scale_backbone(h, 2.0, 2).flatten().tolist() == [1.0, 6.0, 5.0, 7.0]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(fourier_filter(x, 1, 1.0), x, atol=1e-6)  # scale 1: nothing changes
    # scale 0 on a 2 x 2 centre of an 8 x 8 spectrum removes the mean (frequency 0) among others
    assert fourier_filter(x, 1, 0.0).mean(dim=(-2, -1)).abs().max() < 1e-6


def test_rescale_to_matches_the_conditional_std_and_v_space_rescale_leaves_multiplier_zero_alone():
    generator = torch.Generator().manual_seed(1)
    guided, conditional = (
        torch.randn(2, 4, 4, 4, generator=generator) * 3,
        torch.randn(2, 4, 4, 4, generator=generator),
    )
    rescaled = rescale_to(guided, conditional, 1.0)
    assert torch.allclose(rescaled.std(dim=(1, 2, 3)), conditional.std(dim=(1, 2, 3)), rtol=1e-5)
    assert torch.equal(rescale_to(guided, conditional, 0.0), guided)
    log: list[str] = []
    passes = FakePasses(log)
    for prediction_type in ("epsilon", "v_prediction"):
        s = GuidanceStep(
            0,
            4,
            torch.tensor(700.0),
            torch.randn(2, 4, 4, 4, generator=generator),
            5.0,
            make_solver("ddim", 4).alphas_cumprod,
            prediction_type,
            passes,
        )
        unconditional, conditional = (
            torch.randn(2, 4, 4, 4, generator=generator),
            torch.randn(2, 4, 4, 4, generator=generator),
        )
        cfg = unconditional + 5.0 * (conditional - unconditional)
        assert torch.allclose(RescaleCFGHook(0.0, "v").adjust(s, unconditional, conditional, cfg), cfg)
        full = RescaleCFGHook(1.0, "v").adjust(s, unconditional, conditional, cfg)
        # in v space the result has the conditional prediction's std (ComfyUI's RescaleCFG with multiplier 1)
        stds = [velocity(s, output).std(dim=(1, 2, 3)) for output in (full, conditional)]
        assert torch.allclose(*stds, rtol=1e-4)


def velocity(step: GuidanceStep, output: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0, of what `output` implies."""
    alpha = step.alpha_bar()
    return alpha**0.5 * step.to_noise(output) - (1 - alpha) ** 0.5 * step.to_clean(output)


def test_pag_layer_names_are_diffusers_module_names():
    names = [name for name, _ in named_self_attention_blocks(UNet(UNET_PRESETS["sd15"], device="meta"))]
    assert len(names) == 16 and "mid_block.attentions.0.transformer_blocks.0.attn1" in names
    assert names[0] == "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert "up_blocks.3.attentions.2.transformer_blocks.0.attn1" in names


@pytest.mark.parametrize(
    ("halves", "blended"), [((NEGATIVE, POSITIVE), [0]), ((NEGATIVE,), [0, 1]), ((POSITIVE,), [])]
)
def test_reference_attention_blends_the_rows_of_the_negative_half(halves, blended):
    attention = fl.SelfAttention(2, num_heads=1, use_bias=False)
    root = fl.Chain(attention)
    root.set_context(
        "reference", {"mode": "write", "style_fidelity": 1.0, "uses_guidance": True, "halves": halves}
    )
    adapter = ReferenceAttention(attention, "reference").inject(root)
    generator = torch.Generator().manual_seed(2)
    x, reference = torch.randn(2, 3, 2, generator=generator), torch.randn(2, 1, 2, generator=generator)
    adapter(reference)
    root.use_context("reference")["mode"] = "read"
    output = adapter(x)
    plain = attention(x)
    for row in range(2):  # style fidelity 1: the negative rows are the plain attention, the others not
        assert torch.allclose(output[row], plain[row], atol=1e-6) == (row in blended)
    adapter.eject()
