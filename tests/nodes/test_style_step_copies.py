"""The step-copy audit of tests/nodes/test_step_copies.py (no per-step copies, resizes or host syncs) on its full
stack with reference-only in adain mode and StyleAligned with a reference latent. A module of its own: the audit
needs the float64 models of a fresh models folder (the checkpoint cache keys on the folder)."""

from dataclasses import replace

import torch

from foundationals.latent_diffusion.adapters.reference_only import ReferenceOnlyPatch
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.demo import SD15_CHECKPOINT
from nodes.latent_nodes import FluxionEmptyLatent, FluxionVAEEncode
from nodes.reference_only_nodes import FluxionReferenceOnly
from nodes.sampler_nodes import sample_latents
from nodes.style_aligned_nodes import FluxionStyleAligned
from tests.nodes.test_step_copies import STEPS, Progress, demo_models, float64_models, spy  # noqa: F401 (fixtures)
from tests.nodes.test_step_copies import _wire as step_copies_wire

STYLE = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))


def test_no_step_after_the_first_copies_or_syncs_with_style_aligned_and_adain(spy, float64_models):  # noqa: F811
    """The step-copy audit of tests/nodes/test_step_copies.py on its full stack plus both new adapters."""
    model, positive, negative = step_copies_wire()
    assert isinstance(model.patches[-1], ReferenceOnlyPatch)
    model = replace(model, patches=model.patches[:-1])  # its reference-only (attn), for the adain mode
    vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[2]
    model = FluxionReferenceOnly().apply(model, vae, STYLE, 1.0, 0.5, 0.0, 1.0, "adain", 0.8)[0]
    reference = FluxionVAEEncode().encode(vae, STYLE)[0]
    model = FluxionStyleAligned().apply(model, 0.9, True, True, True, False, 0.0, 1.0, reference)[0]
    latent = FluxionEmptyLatent().generate(64, 64, 2)[0]
    spy.active = True
    sample_latents(model, positive, negative, latent, 1, STEPS, 5.0, "euler", "normal", 1.0, Progress(spy))
    spy.active = False
    assert spy.step == STEPS
    assert spy.repeated() == []
    assert [sync for sync in spy.syncs if sync[0] > 0] == []
