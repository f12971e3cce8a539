"""Reference-only control (SD1.5 and SDXL): the generation attends to a reference image's own features.

As diffusers' community `stable_diffusion_reference` pipeline (`reference_attn=True`) and sd-webui-controlnet's
"reference_only": before each UNet call, the reference latents, noised to the current timestep, run through
the same UNet (same text, no control residuals); every self-attention block (attn1) stores its normalized
input tokens. In the generation's call, an enabled block attends over `[its own tokens, the reference's]`
as keys/values (the same to_k/to_v). With guidance, the unconditional half is blended:
`style_fidelity x plain self-attention + (1 - style_fidelity) x reference attention`; the conditional half
keeps the reference attention.

`strength` is the pipelines' `attention_auto_machine_weight`: self-attention blocks are ranked by width
(widest first, diffusers' module order among equals) and block i of N uses the reference when
`strength > i / N` (0: none, 1: all).

`mode` picks what is shared, as Advanced-ControlNet's Reference (`reference_attn`, `reference_adain`,
`reference_attn+adain`) and sd-webui-controlnet's `reference_adain`: "attn" (the attention above), "adain" or
"attn+adain". AdaIN acts on the output of UNet blocks (LDM's `input_blocks.i` before its skip is stored,
`middle_block`, `output_blocks.i`): in the reference pass each stores its per-channel mean and variance over the
pixels (population variance); in the generation's call its output becomes
`(x - mean) / std * std_ref + mean_ref` (`std = sqrt(max(var, 1e-6))`), blended with `x` by `adain_strength`,
and its unconditional rows by `style_fidelity` as above. The blocks and their weights are the references':
SD1.5 (12 input blocks) `input_blocks` 4, 5, 7, 8, 10, 11 weighted `2 (1 - w / 6)`, `output_blocks` 0-7
weighted `2 w / 8`, SDXL-like UNets `input_blocks` 4, 5, 7, 8 and `output_blocks` 0-5, the middle block 0;
a block uses the reference when `strength > weight` (strength 1: the middle block, the two deepest input
blocks, the first output blocks). Advanced-ControlNet cubes style fidelity for SDXL; we do not.

The reference is noised as the scheduler's `add_noise` then `scale_model_input` would give, for any solver:
`sqrt(abar_t) x0 + sqrt(1 - abar_t) noise` on SD's scaled-linear schedule (abar interpolated linearly at
fractional timesteps), with fresh noise each call from the patch's own generator (`seed`), so the sampler's
random stream is untouched (diffusers draws it from the pipeline's generator instead).
"""

from __future__ import annotations

from itertools import count
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ....fluxion import layers as fl
from ....fluxion.adapters.adapter import Adapter
from ....fluxion.casting import compute_placement
from ..guidance import NEGATIVE, Halves, halves_for
from ..model_patch import SamplingRun, Undo
from ..unet import (
    DownBlocks,
    MiddleBlock,
    ResidualAccumulator,
    SelfAttentionBlock,
    UNet,
    UpBlocks,
    cross_attention_blocks,
)

if TYPE_CHECKING:
    from ..stable_diffusion import StableDiffusion

OFF, WRITE, READ = "off", "write", "read"
ATTN, ADAIN, ATTN_ADAIN = "attn", "adain", "attn+adain"
MODES = (ATTN, ADAIN, ATTN_ADAIN)
ADAIN_EPSILON = 1e-6
_IDS = count()


def scaled_linear_alphas_cumprod(
    beta_start: float = 0.00085, beta_end: float = 0.012, steps: int = 1000
) -> Tensor:
    """Stable Diffusion's training schedule: cumulative products of `1 - beta`, betas linear in sqrt."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class ReferenceAttention(fl.Chain, Adapter[fl.Module]):
    """A self-attention that stores its input in the reference pass and attends over it too in the generation."""

    replaces_attention = True
    """Marks adapters that compute the attention themselves: two of them cannot wrap one self-attention."""

    def __init__(self, target: fl.Module, context: str, enabled: bool = True) -> None:
        self.context = context
        self.enabled = enabled
        self.replaces_attention = enabled  # a disabled one only passes through
        self._bank: list[Tensor] = []
        with self.setup_adapter(target):
            super().__init__(target)

    def _self_attention(self) -> fl.SelfAttention:
        attention = self.target
        while not isinstance(attention, fl.SelfAttention):
            attention = attention.target  # type: ignore[attr-defined]
        return attention

    def attend(self, query: Tensor, memory: Tensor) -> Tensor:
        """The target's projections and attention with `query` tokens over `memory` tokens."""
        result: Any = (query, memory, memory)
        for layer in list(self._self_attention())[1:]:  # skip the (x, x, x) duplication
            result = layer(*result) if isinstance(result, tuple) else layer(result)
        return result

    def forward(self, x: Tensor) -> Tensor:
        plain = self[0]
        state = self.use_context(self.context)
        if not self.enabled or state["mode"] == OFF or in_other_reference_pass(self, state):
            return plain(x)
        if state["mode"] == WRITE:
            self._bank = [x]
            return plain(x)
        if not self._bank:
            raise ValueError(
                "reference-only: no reference tokens stored for this block (the reference pass did not run)"
            )
        reference = self._bank.pop()
        if reference.shape[0] != x.shape[0]:
            raise ValueError(
                f"reference batch {reference.shape[0]} does not match the UNet batch {x.shape[0]}"
            )
        output = self.attend(x, torch.cat([x, reference], dim=1))
        fidelity = state["style_fidelity"]
        halves = state.get("halves") or halves_for(state["uses_guidance"])
        if NEGATIVE in halves and fidelity > 0:  # the unconditional rows keep some plain self-attention
            size = x.shape[0] // len(halves)
            unconditional = slice(halves.index(NEGATIVE) * size, (halves.index(NEGATIVE) + 1) * size)
            conditional_style = output.clone()
            conditional_style[unconditional] = plain(x[unconditional])
            output = fidelity * conditional_style + (1.0 - fidelity) * output
        return output


IN_REFERENCE_PASS = "in_reference_pass"
"""Key of the UNet's "unet" context, set while a reference pass runs: other reference adapters then act plain."""


def in_reference_pass(layer: fl.ContextModule) -> bool:
    """Whether `layer` runs inside a reference pass (of any reference adapter of its UNet)."""
    parent = layer.parent
    context = parent.provider.get_context("unet") if parent is not None else None
    return bool(context and context.get(IN_REFERENCE_PASS))


def in_other_reference_pass(layer: fl.ContextModule, state: dict[str, Any]) -> bool:
    """Whether `layer` (its adapter in READ mode) runs inside another adapter's reference pass."""
    return state["mode"] == READ and in_reference_pass(layer)


def _blend_unconditional(output: Tensor, plain: Tensor, state: dict[str, Any]) -> Tensor:
    """`style_fidelity x plain + (1 - style_fidelity) x output` on the unconditional rows, `output` elsewhere."""
    fidelity = state["style_fidelity"]
    halves = state.get("halves") or halves_for(state["uses_guidance"])
    if NEGATIVE not in halves or fidelity <= 0:
        return output
    size = output.shape[0] // len(halves)
    unconditional = slice(halves.index(NEGATIVE) * size, (halves.index(NEGATIVE) + 1) * size)
    conditional_style = output.clone()
    conditional_style[unconditional] = plain[unconditional]
    return fidelity * conditional_style + (1.0 - fidelity) * output


def reference_adain(x: Tensor, reference_var: Tensor, reference_mean: Tensor) -> Tensor:
    """`x` (B, C, H, W) renormalised per channel to a reference's variance and mean over the pixels."""
    var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
    std = var.clamp(min=ADAIN_EPSILON).sqrt()
    reference_std = reference_var.clamp(min=ADAIN_EPSILON).sqrt()
    return (x - mean) / std * reference_std + reference_mean


class ReferenceAdaIN(fl.ContextModule):
    """After a UNet block: stores its output's statistics in the reference pass, AdaIN towards them after."""

    def __init__(self, context: str, weight: float) -> None:
        super().__init__()
        self.context = context
        self.weight = weight
        self._bank: list[tuple[Tensor, Tensor]] = []

    def describe(self) -> str:
        return f"ReferenceAdaIN(context={self.context}, weight={self.weight:g})"

    def forward(self, x: Tensor) -> Tensor:
        state = self.use_context(self.context)
        if state["mode"] == OFF or in_other_reference_pass(self, state):
            return x
        if state["mode"] == WRITE:
            self._bank = [torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)]
            return x
        if not self._bank:
            raise ValueError(
                "reference-only AdaIN: no reference statistics stored (the reference pass did not run)"
            )
        variance, mean = self._bank.pop()
        if variance.shape[0] != x.shape[0]:
            raise ValueError(
                f"reference batch {variance.shape[0]} does not match the UNet batch {x.shape[0]}"
            )
        output = reference_adain(x, variance, mean)
        strength = state["adain_strength"]
        if strength != 1.0:
            output = strength * output + (1.0 - strength) * x
        return _blend_unconditional(output, x, state)


def adain_sites(unet: UNet) -> list[tuple[fl.Chain, int | None, float]]:
    """Where reference AdaIN goes: (block chain, insertion index or None = append, weight), references' tables."""
    down, middle, up = unet.ensure_find(DownBlocks), unet.ensure_find(MiddleBlock), unet.ensure_find(UpBlocks)
    sd15_like = len(down) == 12
    inputs = [4, 5, 7, 8, 10, 11] if sd15_like else [4, 5, 7, 8]
    outputs = list(range(8)) if sd15_like else list(range(6))
    sites: list[tuple[fl.Chain, int | None, float]] = [(middle, None, 0.0)]
    for w, index in enumerate(inputs):
        if index < len(down):
            block = down[index]
            position = next(i for i, child in enumerate(block) if isinstance(child, ResidualAccumulator))
            sites.append((block, position, 2.0 * (1.0 - w / len(inputs))))
    for w, index in enumerate(outputs):
        if index < len(up):
            sites.append((up[index], None, 2.0 * w / len(outputs)))
    return sites


class ReferencePass(fl.ContextModule):
    """First layer of the UNet while reference-only is on: runs the UNet on the noised reference, then passes x on."""

    def __init__(self, context: str, reference_latents: Tensor, seed: int = 0) -> None:
        super().__init__()
        self.context = context
        self.reference_latents = reference_latents
        self.generator = torch.Generator("cpu").manual_seed(seed)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self._tables: dict[str, Tensor] = {}

    def describe(self) -> str:
        return f"ReferencePass(context={self.context}, reference={tuple(self.reference_latents.shape)})"

    def noised_reference(self, timestep: Tensor, batch: int) -> Tensor:
        """The reference latents at `timestep`'s noise level, as the UNet's input (one per batch item)."""
        latents = self.reference_latents
        if latents.shape[0] not in (1, batch):
            raise ValueError(f"{latents.shape[0]} reference latents for a UNet batch of {batch}")
        latents = latents.expand(batch, *latents.shape[1:])
        # the noise level is read on the timestep's device: no value comes back to the host in the step loop
        table = self._alphas_on(timestep.device)
        t = timestep.reshape(-1)[0].to(table.dtype).clamp(0, len(table) - 1)
        low = t.floor()
        high = (low + 1).clamp(max=len(table) - 1)
        alpha = table[low.long()] + (t - low) * (table[high.long()] - table[low.long()])
        noise = torch.randn(latents.shape, generator=self.generator, dtype=torch.float32)
        noise = noise.to(device=latents.device, dtype=latents.dtype)
        return alpha.sqrt() * latents + (1 - alpha).sqrt() * noise

    def _alphas_on(self, device: torch.device) -> Tensor:
        """The schedule on `device` (float64, or float32 where the device has no float64), made once."""
        table = self._tables.get(str(device))
        if table is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            table = self._tables[str(device)] = self.alphas_cumprod.to(device=device, dtype=dtype)
        return table

    def forward(self, x: Tensor) -> Tensor:
        state = self.use_context(self.context)
        unet = self.ensure_parent
        unet_state = unet.use_context("unet")
        if state["mode"] != READ or unet_state.get(IN_REFERENCE_PASS):
            return x  # off, or inside another adapter's reference pass (which sees the plain UNet)
        control = unet_state["control_residuals"]
        reference = self.noised_reference(unet.use_context("diffusion")["timestep"], x.shape[0])
        state["mode"] = WRITE
        unet_state["control_residuals"] = [0.0] * len(control)
        unet_state[IN_REFERENCE_PASS] = True
        try:
            unet(reference.to(device=x.device, dtype=x.dtype))
        finally:
            state["mode"] = READ
            unet_state["control_residuals"] = control
            unet_state.pop(IN_REFERENCE_PASS, None)
        return x


def attention_replacers(block: SelfAttentionBlock) -> list[str]:
    """Names of the adapters around `block`'s self-attention that compute the attention themselves."""
    found, module = [], list(block)[1]
    while not isinstance(module, fl.SelfAttention):
        if getattr(module, "replaces_attention", False):
            found.append(type(module).__name__)
        module = module.target  # type: ignore[attr-defined]
    return found


def refuse_shared_attention(blocks: list[SelfAttentionBlock], adapter: str) -> None:
    """Raise (before anything is injected) when another adapter already computes these self-attentions."""
    taken = sorted({name for block in blocks for name in attention_replacers(block)})
    if taken:
        raise ValueError(
            f"{adapter} cannot go on a model whose self-attention already carries {', '.join(taken)} "
            "(reference-only in attn / attn+adain mode and StyleAligned each compute it: use one of them, or "
            "reference-only in adain mode beside StyleAligned)"
        )


def self_attention_blocks_by_width(unet: UNet) -> list[SelfAttentionBlock]:
    """Self-attention blocks widest first (diffusers' module order among equal widths): the strength ranking."""
    blocks: list[SelfAttentionBlock] = cross_attention_blocks(unet, SelfAttentionBlock)
    return sorted(blocks, key=lambda block: -block.ensure_find(fl.LayerNorm).normalized_shape[0])


class ReferenceOnly:
    """Reference-only control injected in a UNet: `set_active`, then `eject()` restores the UNet."""

    def __init__(
        self,
        unet: UNet,
        reference_latents: Tensor,
        strength: float = 1.0,
        style_fidelity: float = 0.5,
        uses_guidance: bool = False,
        seed: int = 0,
        mode: str = ATTN,
        adain_strength: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reference-only mode must be one of {', '.join(MODES)}, got {mode!r}")
        channels = unet.config.out_channels
        if (
            unet.config.in_channels != channels
            or reference_latents.dim() != 4
            or reference_latents.shape[1] != channels
        ):
            raise ValueError(
                f"reference-only needs (B, {channels}, h, w) reference latents and a UNet taking {channels} "
                f"channels; got latents {tuple(reference_latents.shape)} for a UNet of {unet.config.in_channels} "
                "input channels (inpainting UNets are not supported)"
            )
        self.unet = unet
        self.context = f"reference_only_{next(_IDS)}"
        blocks = self_attention_blocks_by_width(unet)
        attn, use_adain = mode in (ATTN, ATTN_ADAIN), mode in (ADAIN, ATTN_ADAIN)
        self.attentions = [
            ReferenceAttention(list(block)[1], self.context, enabled=attn and strength > index / len(blocks))
            for index, block in enumerate(blocks)
        ]
        if attn and strength > 0:
            refuse_shared_attention(blocks, "reference-only")
        self.adain_sites = [
            (block, position, ReferenceAdaIN(self.context, weight))
            for block, position, weight in (adain_sites(unet) if use_adain else [])
            if strength > weight
        ]
        device, dtype = compute_placement(unet)
        self.reference_pass = ReferencePass(
            self.context, reference_latents.to(device=device, dtype=dtype), seed
        )
        unet.set_context(
            self.context,
            {
                "mode": OFF,
                "style_fidelity": style_fidelity,
                "uses_guidance": uses_guidance,
                "adain_strength": adain_strength,
            },
        )
        injected: list[ReferenceAttention] = []
        try:
            for attention, block in zip(self.attentions, blocks):
                attention.inject(block)
                injected.append(attention)
            for block, position, module in self.adain_sites:
                block.insert(len(block) if position is None else position, module)
            if any(attention.enabled for attention in self.attentions) or self.adain_sites:
                unet.insert(0, self.reference_pass)
        except BaseException:
            self._remove_adain()
            for attention in reversed(injected):
                attention.eject()
            unet.provider.contexts.pop(self.context, None)
            raise

    def _remove_adain(self) -> None:
        for block, _, module in reversed(self.adain_sites):
            if module in block:
                block.remove(module)

    def set_active(self, active: bool) -> None:
        """Use the reference on the next UNet calls, or act as the plain UNet."""
        self.unet.use_context(self.context)["mode"] = READ if active else OFF

    def eject(self) -> None:
        """Take everything out and forget the context."""
        if self.reference_pass in self.unet:
            self.unet.remove(self.reference_pass)
        self._remove_adain()
        for attention in reversed(self.attentions):
            if attention.parent is not None:
                attention.eject()
        self.unet.provider.contexts.pop(self.context, None)


class ReferenceOnlyPatch:
    """A `ModelPatch`: reference-only control from the reference image's latents (`model.encode_image(image)`).

    Acts on steps whose progress `step / num_steps` lies in `[start, end)` (end 1: up to the last step).
    """

    def __init__(
        self,
        reference_latents: Tensor,
        strength: float = 1.0,
        style_fidelity: float = 0.5,
        start: float = 0.0,
        end: float = 1.0,
        seed: int = 0,
        mode: str = ATTN,
        adain_strength: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reference-only mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 <= adain_strength <= 1.0:
            raise ValueError(f"reference-only adain_strength must be within 0..1, got {adain_strength}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(
                f"reference-only start/end must satisfy 0 <= start <= end <= 1, got {start}, {end}"
            )
        if not 0.0 <= style_fidelity <= 1.0:
            raise ValueError(f"style_fidelity must be within 0..1, got {style_fidelity}")
        self.reference_latents = reference_latents
        self.strength = strength
        self.style_fidelity = style_fidelity
        self.start = start
        self.end = end
        self.seed = seed
        self.mode = mode
        self.adain_strength = adain_strength

    @property
    def label(self) -> str:
        mode = "" if self.mode == ATTN else f"{self.mode}, "
        return f"reference-only ({mode}strength {self.strength:g}, style fidelity {self.style_fidelity:g})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Inject into `model.unet` for this run; the undo restores it exactly."""
        if run is None:
            return lambda: None
        control = ReferenceOnly(
            model.unet,
            self.reference_latents,
            self.strength,
            self.style_fidelity,
            run.uses_guidance,
            self.seed,
            self.mode,
            self.adain_strength,
        )

        def on_step(step: int) -> None:
            progress = run.progress(step)
            control.set_active(self.start <= progress and (progress < self.end or self.end >= 1.0))

        def follow_halves(halves: Halves) -> None:  # a guidance pass on one half of the batch
            model.unet.use_context(control.context)["halves"] = halves

        on_step(run.first_step)
        run.on_step(on_step)
        run.on_halves(follow_halves)

        def undo() -> None:
            if on_step in run.step_hooks:
                run.step_hooks.remove(on_step)
            if follow_halves in run.halves_listeners:
                run.halves_listeners.remove(follow_halves)
            control.eject()

        return undo
