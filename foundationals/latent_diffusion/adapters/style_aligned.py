"""StyleAligned (Hertz et al. 2023, "Style Aligned Image Generation via Shared Attention"), SD1.5 and SDXL.

In every self-attention of the UNet, each image of the batch attends to its own tokens and to the style
reference's: after the query / key / value projections, the queries and keys of each image are AdaIN-normalised
to the reference's statistics (per channel, over the tokens), and the reference's keys and values are
concatenated to its own along the tokens. The semantics are refiners' `StyleAlignedAdapter`:

- AdaIN: `(t - mean(t)) / (std(t) + 1e-8) * std(r) + mean(r)`, mean and (unbiased) std over the tokens, per
  channel of the projection (all heads together);
- `scale` multiplies the reference's keys and values concatenated to the other images (refiners scales both;
  Google's reference code and the ComfyUI community node scale the keys only: the two agree at the default 1);
- with guidance the batch is `[negative half, positive half]` (each with the same images); each half has its own
  reference, the half's first image (refiners: first conditional / first unconditional image).

Two ways to give the reference:

- in the batch (`reference_latents=None`): image 0 of each half is the reference. It attends only to itself
  (`share_reference=False`, the default: its output is the plain UNet's), or goes through the same shared
  attention as the others (`share_reference=True`, refiners' path, equal to the plain one up to rounding);
- a reference LATENT: before each UNet call its latents, noised to the step's noise level (as reference-only
  noises them: `sqrt(abar_t) x0 + sqrt(1 - abar_t) noise`, one noise draw shared by the halves), run through
  the same UNet (each half's first text, no ControlNet residuals) and every self-attention stores the
  reference's queries, keys and values; in the generation's call every image is aligned to them. This equals
  prepending the noised reference to the batch as ComfyUI's StyleAligned community nodes do (the prepended
  image attends only to itself), except that the reference is re-noised from its clean latents each step
  instead of following a DDIM-inversion trajectory. It costs one more UNet pass per call.

Shared group / layer norms (the community node's `share_norm`) and the paper's score shift are not implemented.

StyleAligned composes with LoRA, ControlNet, IP-Adapter, guidance and reference-only in adain mode; it refuses a
model whose self-attention reference-only (attn / attn+adain) already computes, and reference-only refuses it in
turn (each computes the attention itself). Inside another adapter's reference pass it acts as the plain UNet.
"""

from __future__ import annotations

from itertools import count
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ....fluxion import layers as fl
from ....fluxion.adapters.adapter import Adapter
from ....fluxion.casting import compute_placement
from ..guidance import Halves, halves_for
from ..model_patch import SamplingRun, Undo
from ..unet import SelfAttentionBlock, UNet
from .reference_only import READ, WRITE, ReferencePass, in_reference_pass, refuse_shared_attention

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

OFF, BATCH = "off", "batch"
"""Modes of a StyleAligned context besides reference-only's WRITE / READ (an external reference)."""
_IDS = count()


def adain(features: Tensor, reference: Tensor, epsilon: float = 1e-8) -> Tensor:
    """`features` (..., tokens, channels) renormalised to `reference`'s per-channel mean and std over the tokens.

    Refiners' AdaIN: unbiased std, `epsilon` added to the features' std; `reference` broadcasts on `features`.
    """
    correction = 1 if features.shape[-2] > 1 else 0
    mean = features.mean(dim=-2, keepdim=True)
    std = features.std(dim=-2, keepdim=True, correction=correction)
    reference_mean = reference.mean(dim=-2, keepdim=True)
    reference_std = reference.std(dim=-2, keepdim=True, correction=correction)
    return (features - mean) / (std + epsilon) * reference_std + reference_mean


def _innermost_self_attention(module: fl.Module) -> fl.SelfAttention:
    while not isinstance(module, fl.SelfAttention):
        module = module.target  # type: ignore[attr-defined]
    return module


class SharedSelfAttention(fl.Chain, Adapter[fl.SelfAttention]):
    """A self-attention whose images also attend to the style reference's tokens (see the module docstring)."""

    replaces_attention = True

    def __init__(self, target: fl.SelfAttention, context: str) -> None:
        self.context = context
        self._bank: list[tuple[Tensor, Tensor, Tensor]] = []
        with self.setup_adapter(target):
            super().__init__(target)

    def projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The target's query, key and value projections of `x` (B, tokens, width)."""
        return self.target[1](x, x, x)

    def attend(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """The target's scaled dot-product attention and output projection."""
        return self.target[3](self.target[2](query, key, value))

    def forward(self, x: Tensor) -> Tensor:
        plain = self[0]
        state = self.use_context(self.context)
        mode = state["mode"]
        if mode == OFF or (mode != WRITE and in_reference_pass(self)):
            return plain(x)  # off, or inside another adapter's reference pass (which sees the plain UNet)
        halves: Halves = state.get("halves") or halves_for(state["uses_guidance"])
        groups = len(halves)
        if x.shape[0] % groups != 0:
            raise ValueError(
                f"StyleAligned: a batch of {x.shape[0]} cannot be split into the halves {halves}"
            )
        size = x.shape[0] // groups
        if mode == BATCH and size == 1 and not state["share_reference"]:
            return plain(x)  # every image is its half's reference: nothing to share
        query, key, value = (t.unflatten(0, (groups, size)) for t in self.projections(x))
        if mode == WRITE:  # the reference pass: store the reference's tokens, attend as usual
            self._bank = [(query[:, :1], key[:, :1], value[:, :1])]
            return self.attend(*(t.flatten(0, 1) for t in (query, key, value)))
        if mode == READ:
            if not self._bank:
                raise ValueError("StyleAligned: no reference tokens stored (the reference pass did not run)")
            reference = self._bank.pop()
            if reference[0].shape[0] != groups:
                raise ValueError(
                    f"StyleAligned: the reference pass had {reference[0].shape[0]} halves, this call {groups}"
                )
            shared = self._shared(state, (query, key, value), reference, first_is_reference=False)
            return self.attend(*shared)
        reference = (query[:, :1], key[:, :1], value[:, :1])
        if state["share_reference"]:
            return self.attend(*self._shared(state, (query, key, value), reference, first_is_reference=True))
        others = self._shared(state, (query[:, 1:], key[:, 1:], value[:, 1:]), reference, False)
        alone = [t.flatten(0, 1) for t in reference]
        hidden = torch.cat(
            [
                self.target[2](*alone).unflatten(0, (groups, 1)),
                self.target[2](*others).unflatten(0, (groups, size - 1)),
            ],
            dim=1,
        )
        return self.target[3](hidden.flatten(0, 1))

    @staticmethod
    def _shared(
        state: dict,
        targets: tuple[Tensor, Tensor, Tensor],
        reference: tuple[Tensor, Tensor, Tensor],
        first_is_reference: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (flattened to a batch) of `targets` (G, B, L, D) sharing `reference`'s."""
        query, key, value = targets
        reference_query, reference_key, reference_value = reference
        if state["adain_queries"]:
            query = adain(query, reference_query)
        if state["adain_keys"]:
            key = adain(key, reference_key)
        if state["adain_values"]:
            value = adain(value, reference_value)
        scale = state["scale"]
        if scale != 1.0:
            factors = torch.full((1, query.shape[1], 1, 1), scale, dtype=query.dtype, device=query.device)
            if first_is_reference:
                factors[:, 0] = 1.0  # refiners: the reference's own copy of itself is not scaled
            reference_key, reference_value = reference_key * factors, reference_value * factors
        batch = query.shape[1]  # the reference may have another number of tokens (another size)
        key = torch.cat([key, reference_key.expand(-1, batch, -1, -1)], dim=-2)
        value = torch.cat([value, reference_value.expand(-1, batch, -1, -1)], dim=-2)
        return query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1)


class SharedReferencePass(ReferencePass):
    """Runs the UNet on the noised reference (one noise draw for every row) before the generation's call."""

    def noised_reference(self, timestep: Tensor, batch: int) -> Tensor:
        one = super().noised_reference(timestep, 1)
        return one.expand(batch, *one.shape[1:])


def self_attentions(unet: UNet) -> list[fl.SelfAttention]:
    """The self-attention (attn1) of every transformer block, in tree order."""
    return [_innermost_self_attention(list(block)[1]) for block in unet.layers(SelfAttentionBlock)]


class StyleAligned:
    """StyleAligned injected in a UNet (active at once); `eject()` restores the UNet exactly."""

    def __init__(
        self,
        unet: UNet,
        reference_latents: Tensor | None = None,
        scale: float = 1.0,
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        share_reference: bool = False,
        uses_guidance: bool = False,
        seed: int = 0,
    ) -> None:
        if reference_latents is not None:
            channels = unet.config.out_channels
            if (
                unet.config.in_channels != channels
                or reference_latents.dim() != 4
                or reference_latents.shape[0] != 1
                or reference_latents.shape[1] != channels
            ):
                raise ValueError(
                    f"StyleAligned needs one (1, {channels}, h, w) reference latent and a UNet taking {channels} "
                    f"channels; got latents {tuple(reference_latents.shape)} for a UNet of "
                    f"{unet.config.in_channels} input channels (inpainting UNets take no reference latent)"
                )
        refuse_shared_attention(list(unet.layers(SelfAttentionBlock)), "StyleAligned")
        self.unet = unet
        self.context = f"style_aligned_{next(_IDS)}"
        self.attentions = [
            SharedSelfAttention(attention, self.context) for attention in self_attentions(unet)
        ]
        self.reference_pass: SharedReferencePass | None = None
        if reference_latents is not None:
            device, dtype = compute_placement(unet)
            latents = reference_latents.to(device=device, dtype=dtype)
            self.reference_pass = SharedReferencePass(self.context, latents, seed)
        unet.set_context(
            self.context,
            {
                "mode": BATCH if reference_latents is None else READ,
                "scale": scale,
                "adain_queries": adain_queries,
                "adain_keys": adain_keys,
                "adain_values": adain_values,
                "share_reference": share_reference,
                "uses_guidance": uses_guidance,
            },
        )
        injected: list[SharedSelfAttention] = []
        try:
            for attention in self.attentions:
                attention.inject()
                injected.append(attention)
            if self.reference_pass is not None:
                unet.insert(0, self.reference_pass)
        except BaseException:
            for attention in reversed(injected):
                attention.eject()
            unet.provider.contexts.pop(self.context, None)
            raise

    def set_halves(self, halves: Halves | None) -> None:
        """The batch layout of the next UNet calls (None: the run's main layout)."""
        self.unet.use_context(self.context)["halves"] = halves

    def set_active(self, active: bool) -> None:
        """Share attention on the next UNet calls, or act as the plain UNet."""
        mode = (BATCH if self.reference_pass is None else READ) if active else OFF
        self.unet.use_context(self.context)["mode"] = mode

    def eject(self) -> None:
        """Take everything out and forget the context."""
        if self.reference_pass is not None and self.reference_pass in self.unet:
            self.unet.remove(self.reference_pass)
        for attention in reversed(self.attentions):
            if attention.parent is not None:
                attention.eject()
        self.unet.provider.contexts.pop(self.context, None)


class StyleAlignedPatch:
    """A `ModelPatch`: StyleAligned for a run, with the batch's first image (or `reference_latents`) as style.

    `reference_latents` are scaled latents (1, 4, h, w) (`model.encode_image(image)`, or a LATENT's samples times
    the scaling factor). Acts on steps whose progress `step / num_steps` lies in `[start, end)`.
    """

    def __init__(
        self,
        reference_latents: Tensor | None = None,
        scale: float = 1.0,
        adain_queries: bool = True,
        adain_keys: bool = True,
        adain_values: bool = False,
        share_reference: bool = False,
        start: float = 0.0,
        end: float = 1.0,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"StyleAligned start/end must satisfy 0 <= start <= end <= 1, got {start}, {end}"
            )
        if not scale >= 0.0:
            raise ValueError(f"StyleAligned scale must be >= 0, got {scale}")
        self.reference_latents = reference_latents
        self.scale = scale
        self.adain = (adain_queries, adain_keys, adain_values)
        self.share_reference = share_reference
        self.start = start
        self.end = end
        self.seed = seed

    @property
    def label(self) -> str:
        source = "batch image 0" if self.reference_latents is None else "a reference latent"
        adain = "+".join(name for name, on in zip("qkv", self.adain) if on) or "none"
        return f"StyleAligned (reference: {source}, AdaIN {adain}, scale {self.scale:g})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Inject into `model.unet` for this run; the undo restores it exactly."""
        if run is None:
            return lambda: None
        aligned = StyleAligned(
            model.unet,
            self.reference_latents,
            self.scale,
            *self.adain,
            share_reference=self.share_reference,
            uses_guidance=run.uses_guidance,
            seed=self.seed,
        )

        def on_step(step: int) -> None:
            progress = run.progress(step)
            aligned.set_active(self.start <= progress and (progress < self.end or self.end >= 1.0))

        on_step(run.first_step)
        run.on_step(on_step)
        run.on_halves(aligned.set_halves)

        def undo() -> None:
            if on_step in run.step_hooks:
                run.step_hooks.remove(on_step)
            if aligned.set_halves in run.halves_listeners:
                run.halves_listeners.remove(aligned.set_halves)
            aligned.eject()

        return undo
