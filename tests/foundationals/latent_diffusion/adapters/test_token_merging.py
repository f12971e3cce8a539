"""Token merging (ToMe for SD): the merge against a hand-derived reference and against ComfyUI's tomesd code,
ratio 0 is the exact run, the merged count and the unmerged shape, exact inject / eject.

The reference below is written from the method's description (loops over tokens, no shared code with ours): for
every token the merge-then-unmerge round trip gives the mean of its group (a destination and the sources merged
into it). The tolerance and the measured differences are in tests/support/parity.py (`token_merging`).
With FLUXION_COMFYUI (a ComfyUI checkout) and FLUXION_COMFYUI_PYTHON (its venv's python), ComfyUI's own
`bipartite_soft_matching_random2d` runs in a subprocess on the same tokens and destinations (same check).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap

import pytest
import torch

from foundationals.latent_diffusion.adapters.token_merging import (
    TokenMergingPatch,
    TokenMergingState,
    bipartite_merge,
    destination_choice,
    full_resolution_self_attentions,
    inject_token_merging,
)
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from tests.support.guided import guided_text_to_image
from tests.support.parity import assert_parity
from tests.support.tiny_sd import (
    diffusers_autoencoder,
    diffusers_unet,
    ours_from_diffusers,
    transformers_text_encoder,
)


def reference_round_trip(
    x: torch.Tensor, height: int, width: int, r: int, choice: torch.Tensor
) -> torch.Tensor:
    """unmerge(merge(x)) from the method's description, one token at a time."""
    batch, tokens, _ = x.shape
    cell = choice.reshape(height // 2, width // 2)
    destinations = sorted(
        (2 * i + int(cell[i, j]) // 2) * width + 2 * j + int(cell[i, j]) % 2
        for i in range(height // 2)
        for j in range(width // 2)
    )
    sources = [t for t in range(tokens) if t not in destinations]
    out = x.clone()
    for b in range(batch):
        unit = x[b] / x[b].norm(dim=-1, keepdim=True)
        best = {}
        for s in sources:
            scores = [float(unit[s] @ unit[d]) for d in destinations]
            k = max(range(len(destinations)), key=lambda i: scores[i])
            best[s] = (scores[k], destinations[k])
        merged = sorted(sources, key=lambda s: -best[s][0])[: min(r, len(sources))]
        groups = {d: [d] for d in destinations}
        for s in merged:
            groups[best[s][1]].append(s)
        for members in groups.values():
            mean = x[b, members].mean(dim=0)
            for t in members:
                out[b, t] = mean
    return out


@pytest.mark.parametrize(("height", "width", "ratio"), [(6, 6, 0.5), (5, 7, 0.3), (8, 4, 0.9)])
def test_merge_matches_the_hand_derived_reference(height, width, ratio):
    generator = torch.Generator().manual_seed(height * width)
    x = torch.randn(2, height * width, 16, generator=generator)
    choice = destination_choice(height, width, generator)
    r = int(height * width * ratio)
    merge, unmerge = bipartite_merge(x, height, width, r, choice)
    merged = merge(x)
    sources = height * width - (height // 2) * (width // 2)
    assert merged.shape == (2, height * width - min(r, sources), 16)
    back = unmerge(merged)
    assert back.shape == x.shape
    assert_parity("token_merging", back, reference_round_trip(x, height, width, r, choice))
    # another width through the same merge (an attention's outputs): the unmerge puts them back per token
    projection = torch.randn(16, 24, generator=generator)
    torch.testing.assert_close(unmerge(merged @ projection), back @ projection, rtol=1e-5, atol=1e-5)


COMFYUI_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    sys.path.insert(0, sys.argv[1])
    from comfy_extras.nodes_tomesd import bipartite_soft_matching_random2d
    data = torch.load(sys.argv[2])
    results = {}
    for name, case in data.items():
        x, h, w, r, seed = case["x"], case["h"], case["w"], case["r"], case["seed"]
        torch.manual_seed(seed)
        merge, unmerge = bipartite_soft_matching_random2d(x, w, h, 2, 2, r)
        merged = merge(x)
        torch.manual_seed(seed)
        choice = torch.randint(4, size=(h // 2, w // 2, 1))
        results[name] = {"merged": merged, "round_trip": unmerge(merged), "choice": choice}
    torch.save(results, sys.argv[3])
    """
)


@pytest.mark.skipif(
    not (os.environ.get("FLUXION_COMFYUI") and os.environ.get("FLUXION_COMFYUI_PYTHON")),
    reason="set FLUXION_COMFYUI and FLUXION_COMFYUI_PYTHON to compare with ComfyUI's tomesd code",
)
def test_merge_matches_comfyui_tomesd(tmp_path):
    cases = {}
    for index, (height, width, ratio) in enumerate([(8, 8, 0.5), (16, 16, 0.3), (6, 10, 0.7)]):
        x = torch.randn(2, height * width, 32, generator=torch.Generator().manual_seed(index))
        cases[f"case{index}"] = {
            "x": x,
            "h": height,
            "w": width,
            "r": int(height * width * ratio),
            "seed": 7 + index,
        }
    inputs, outputs, script = tmp_path / "in.pt", tmp_path / "out.pt", tmp_path / "tome.py"
    torch.save(cases, inputs)
    script.write_text(COMFYUI_SCRIPT)
    subprocess.run(
        [
            os.environ["FLUXION_COMFYUI_PYTHON"],
            str(script),
            os.environ["FLUXION_COMFYUI"],
            str(inputs),
            str(outputs),
        ],
        check=True,
        timeout=300,
    )
    theirs = torch.load(outputs)
    report = {}
    for name, case in cases.items():
        merge, unmerge = bipartite_merge(case["x"], case["h"], case["w"], case["r"], theirs[name]["choice"])
        merged = merge(case["x"])
        assert merged.shape == theirs[name]["merged"].shape
        back = unmerge(merged)
        report[name] = assert_parity("token_merging", back, theirs[name]["round_trip"])
    print("ours vs ComfyUI tomesd round trip max|Δ|:", json.dumps(report))


@pytest.fixture(scope="module")
def sd():
    return ours_from_diffusers(diffusers_unet(), diffusers_autoencoder(), transformers_text_encoder())


def run(sd, patches) -> torch.Tensor:
    return guided_text_to_image(sd, patches, "a red fox", "blurry", steps=4, guidance_scale=6.0, seed=3)


def test_ratio_zero_is_the_exact_run_and_merging_acts_on_the_full_resolution_blocks(sd):
    exact = run(sd, [])
    torch.testing.assert_close(run(sd, [TokenMergingPatch(ratio=0.0)]), exact, rtol=0, atol=0)
    # the adapters injected with ratio 0 pass every token through: the same computation
    state = TokenMergingState(0.0, torch.Generator().manual_seed(0))
    adapters = inject_token_merging(sd.unet, state)
    try:
        torch.testing.assert_close(run(sd, []), exact, rtol=0, atol=0)
    finally:
        for adapter in reversed(adapters):
            adapter.eject()
    assert len(full_resolution_self_attentions(sd.unet)) == 5  # tiny SD1.5: 2 down + 3 up blocks at level 0
    merged = run(sd, [TokenMergingPatch(ratio=0.5, seed=1)])
    again = run(sd, [TokenMergingPatch(ratio=0.5, seed=1)])
    torch.testing.assert_close(again, merged, rtol=0, atol=0)  # seeded per run: reproducible
    difference = (merged - exact).abs().max().item()
    print(f"ToMe 0.5 vs exact (tiny SD, 4 DDIM steps): max|Δ| {difference:.3g}")
    assert 0 < difference < 0.5


def test_inject_eject_restores_the_tree_and_weights_exactly(sd):
    unet = sd.unet
    tree = repr(unet)
    state = {key: value.clone() for key, value in unet.state_dict().items()}
    run_ = SamplingRun(
        num_steps=4, first_step=0, latent_height=4, latent_width=4, batch_size=1, uses_guidance=True
    )
    with patched(sd, [TokenMergingPatch(ratio=0.5)], run_):
        assert "MergedQueries" in repr(unet)
    assert repr(unet) == tree
    after = unet.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="ratio"):
        TokenMergingPatch(ratio=1.5)
