"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023), as ComfyUI's TomePatchModel applies it.

In the self-attention of the highest-resolution transformer blocks, the queries are merged before the attention
and the outputs unmerged after it: `ratio` of the tokens are folded into similar ones, so the attention (and the
query / output projections) run on fewer tokens, while keys and values keep every token. Which tokens merge:

- the tokens are split into destinations and sources: in every 2 x 2 cell of the token grid one position, drawn
  at random, is a destination (rows / columns past the last whole cell are sources);
- each source's best destination is the one of highest cosine similarity (on the attention's input);
- the `r = int(ratio * tokens)` sources with the highest similarity are averaged into their destination
  (`scatter_reduce` mean, the destination included); the other sources stay;
- after the attention, every merged source gets its destination's output.

ComfyUI's node merges the attention input (`q`) this way on blocks at the latent's own resolution (its
`max_downsample` = 1) and draws the destinations from torch's global generator; here each run gets its own
generator seeded with `seed`, so a run is reproducible and branches do not disturb each other. SDXL has no
transformer at full resolution, so there (as in ComfyUI) the patch changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....fluxion import layers as fl
from ....fluxion.adapters.adapter import Adapter
from ..model_patch import SamplingRun, Undo
from ..unet import CrossAttentionBlock2d, DownBlocks, SelfAttentionBlock, UNet, UpBlocks

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

Merge = Callable[[Tensor], Tensor]


def destination_choice(height: int, width: int, generator: torch.Generator | None) -> Tensor:
    """The destination of every whole 2 x 2 cell, 0..3 (row-major in the cell): `(height // 2, width // 2, 1)`."""
    return torch.randint(4, (height // 2, width // 2, 1), generator=generator)


def bipartite_merge(metric: Tensor, height: int, width: int, r: int, choice: Tensor) -> tuple[Merge, Merge]:
    """(merge, unmerge) for tokens `metric` (B, height * width, C) with `r` sources merged into destinations.

    `choice` holds each 2 x 2 cell's destination (`destination_choice`). `merge(x)` gives (B, N - r, C'): the
    kept sources then the destinations; `unmerge(y)` gives (B, N, C') back, merged sources taking their
    destination's value.
    """
    batch, tokens, _ = metric.shape
    if tokens != height * width:
        raise ValueError(f"token merging: {tokens} tokens for a {height} x {width} grid")
    if r <= 0 or height == 1 or width == 1:
        return _identity, _identity
    device = metric.device
    with torch.no_grad():
        cells_y, cells_x = height // 2, width // 2
        cell = choice.reshape(cells_y, cells_x).to(device)
        rows = 2 * torch.arange(cells_y, device=device)[:, None] + cell // 2
        columns = 2 * torch.arange(cells_x, device=device)[None, :] + cell % 2
        is_destination = torch.zeros(tokens, dtype=torch.bool, device=device)
        is_destination[(rows * width + columns).reshape(-1)] = True
        destinations = is_destination.nonzero().squeeze(1)
        sources = (~is_destination).nonzero().squeeze(1)
        r = min(r, sources.numel())
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = unit[:, sources] @ unit[:, destinations].transpose(1, 2)
        best, best_destination = similarity.max(dim=-1)  # (B, sources)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]
        target = best_destination.gather(1, merged)  # (B, r): index among the destinations
        kept_positions = sources[kept]  # (B, kept): token positions
        merged_positions = sources[merged]  # (B, r)

    def pick(x: Tensor, index: Tensor) -> Tensor:
        return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))

    def merge(x: Tensor) -> Tensor:
        source_values, destination_values = x[:, sources], x[:, destinations]
        moving = pick(source_values, merged)
        destination_values = destination_values.scatter_reduce(
            1, target[..., None].expand(-1, -1, x.shape[-1]), moving, reduce="mean", include_self=True
        )
        return torch.cat([pick(source_values, kept), destination_values], dim=1)

    def unmerge(y: Tensor) -> Tensor:
        count = kept.shape[1]
        kept_values, destination_values = y[:, :count], y[:, count:]
        channels = y.shape[-1]
        out = y.new_empty(batch, tokens, channels)
        out[:, destinations] = destination_values
        out.scatter_(1, kept_positions[..., None].expand(-1, -1, channels), kept_values)
        out.scatter_(
            1, merged_positions[..., None].expand(-1, -1, channels), pick(destination_values, target)
        )
        return out

    return merge, unmerge


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class TokenMergingState:
    """One run's token merging: the ratio, the destinations' generator, and the unmerge of the attention running."""

    ratio: float
    generator: torch.Generator
    pending: list[Merge] = field(default_factory=list)
    merged_calls: int = 0


class MergedQueries(fl.Chain, Adapter[fl.Module]):
    """Wraps the input layer of a self-attention (x -> q, k, v inputs): merges the query tokens."""

    def __init__(self, target: fl.Module, state: TokenMergingState) -> None:
        self._state = state
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, x: Tensor) -> Any:
        query, key, value, *rest = self[0](x)
        image = self.use_context("spatial_transformer")["image"]
        height, width = image.shape[-2:]
        r = int(query.shape[1] * self._state.ratio)
        if query.shape[1] != height * width or r <= 0:
            self._state.pending.append(_identity)
            return (query, key, value, *rest)
        choice = destination_choice(height, width, self._state.generator)
        merge, unmerge = bipartite_merge(query, height, width, r, choice)
        self._state.pending.append(unmerge)
        self._state.merged_calls += 1
        return (merge(query), key, value, *rest)

    def describe(self) -> str:
        return f"MergedQueries(ratio={self._state.ratio:g})"


class UnmergedOutput(fl.Chain, Adapter[fl.Module]):
    """Wraps the output projection of a self-attention whose queries were merged: unmerges its tokens."""

    def __init__(self, target: fl.Module, state: TokenMergingState) -> None:
        self._state = state
        with self.setup_adapter(target):
            super().__init__(target)

    def forward(self, x: Tensor) -> Tensor:
        out = self[0](x)
        unmerge = self._state.pending.pop() if self._state.pending else _identity
        return unmerge(out)

    def describe(self) -> str:
        return "UnmergedOutput"


def full_resolution_self_attentions(unet: UNet) -> list[fl.SelfAttention]:
    """The self-attentions of the transformer blocks at the latent's own resolution (before the first
    downsampler, after the last upsampler)."""
    found: list[fl.SelfAttention] = []
    down = list(unet.ensure_find(DownBlocks))
    for block in down[1:]:
        if block.find(fl.Downsample) is not None:
            break
        found += _self_attentions(block)
    up = list(unet.ensure_find(UpBlocks))
    last_upsampler = max((i for i, block in enumerate(up) if block.find(fl.Upsample) is not None), default=-1)
    for block in up[last_upsampler + 1 :]:
        found += _self_attentions(block)
    return found


def _self_attentions(block: fl.Chain) -> list[fl.SelfAttention]:
    if block.find(CrossAttentionBlock2d) is None:
        return []
    return [
        attention.ensure_find(fl.SelfAttention)
        for attention in block.layers(SelfAttentionBlock, recurse=True)
    ]


def inject_token_merging(unet: UNet, state: TokenMergingState) -> list[fl.Chain]:
    """Wrap the full-resolution self-attentions' input and output layers; eject the returned adapters to undo."""
    adapters: list[fl.Chain] = []
    try:
        for attention in full_resolution_self_attentions(unet):
            children = list(attention)
            adapters.append(MergedQueries(children[0], state).inject(attention))
            adapters.append(UnmergedOutput(children[-1], state).inject(attention))
    except BaseException:
        for adapter in reversed(adapters):
            adapter.eject()  # type: ignore[attr-defined]
        raise
    return adapters


class TokenMergingPatch:
    """A `ModelPatch`: ToMe on the full-resolution self-attentions for the run (ratio 0 changes nothing)."""

    def __init__(self, ratio: float = 0.3, seed: int = 0) -> None:
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"token merging: ratio must be between 0 and 1, got {ratio}")
        self.ratio, self.seed = ratio, seed

    @property
    def label(self) -> str:
        return f"token merging (ratio {self.ratio:g}, seed {self.seed})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None or self.ratio <= 0.0:
            return lambda: None
        state = TokenMergingState(self.ratio, torch.Generator("cpu").manual_seed(self.seed))
        adapters = inject_token_merging(model.unet, state)

        def undo() -> None:
            for adapter in reversed(adapters):
                adapter.eject()  # type: ignore[attr-defined]
            state.pending.clear()

        return undo
