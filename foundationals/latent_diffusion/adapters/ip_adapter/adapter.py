"""IP-Adapter (base and plus, SD1.5 and SDXL): image prompts through decoupled cross-attention.

Every `CrossAttentionBlock` of the UNet gets an `ImageCrossAttention` adapter in place of its attention's
`ScaledDotProductAttention`: the output becomes `text attention + scale x attention(query, to_k_ip(tokens),
to_v_ip(tokens))`, before the attention's output projection (as tencent-ailab's and diffusers' processors).
The image tokens, the scale and an optional mask travel by context. The tokens come from the CLIP image
encoder through the adapter's image projection: base, a Linear to N tokens and a LayerNorm on the image
embedding; plus, a perceiver resampler on the penultimate hidden states.

Several reference images: each image's CLIP embedding is first multiplied by its weight (ComfyUI_IPAdapter_plus'
encoder weight), then
- "concat": every image is projected on its own and the token sequences are concatenated (N images x T
  tokens, one attention over all of them: diffusers' multi-image input, IPAdapter_plus' "concat");
- "average": the weighted embeddings are averaged (`mean_i(w_i e_i)`) and projected once (T tokens:
  IPAdapter_plus' "average").
Negative (unconditional) embeddings default to diffusers' choice: a zero image embedding for base, the
encoder's penultimate hidden states of an all-zero (normalized) pixel image for plus. With "average" the
first negative is used, as IPAdapter_plus does.

A mask (H, W) or (B, H, W) in 0..1 restricts the adapter to a region: at each block the image-attention
output is multiplied by the mask resized (bilinear) to that block's token grid.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from itertools import count
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from .....fluxion.casting import compute_placement
from ....clip.image_encoder import CLIPImageEncoder, CLIPImageHiddenState, preprocess_images
from ....formats.ip_adapter import (
    BASE,
    PLUS,
)
from ...guidance import Halves, select_halves
from ...model_patch import SamplingRun, Undo
from ...resizing import resize_mask
from ...unet import CrossAttentionBlock, UNet, cross_attention_blocks
from ..regional import Region, latent_region_mask, new_region_name

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion

from .embeddings import IMAGE_EMBEDS, PENULTIMATE, ImageEmbeddings
from .model import ImageProjection, PerceiverResampler

COMBINE_MODES = ("concat", "average")
FAMILIES = {768: "SD1.5", 1024: "SD2.x", 2048: "SDXL"}
ENCODERS_BY_EMBEDDING = {768: "ViT-L", 1024: "ViT-H", 1280: "bigG"}  # projected image embedding width
ENCODERS_BY_HIDDEN = {1024: "ViT-L", 1280: "ViT-H", 1664: "bigG"}  # hidden-state width


# -- the decoupled cross-attention --------------------------------------------------------------------------


def _query(query: Tensor, *keys_values: Tensor) -> Tensor:
    return query


class ImageAttentionWeight(fl.ContextModule):
    """Multiplies the image attention by the adapter's scale and, if set, by its mask on this block's grid."""

    def __init__(self, context: str) -> None:
        super().__init__()
        self.context = context

    def forward(self, x: Tensor) -> Tensor:
        state = self.use_context(self.context)
        x = x * state["scale"]
        mask: Tensor | None = state.get("mask")
        if mask is None:
            return x
        height, width = self.use_context("spatial_transformer")["image"].shape[-2:]
        grids: dict[tuple[object, ...], Tensor] = state.setdefault("mask_grids", {})
        key = (int(height), int(width), str(x.device), x.dtype)
        grid = grids.get(key)
        if grid is None:  # once per grid size for the run, not once per block and step
            on_device = mask[:, None].to(device=x.device, dtype=x.dtype)
            grid = resize_mask(on_device, (height, width), "bilinear")
            grid = grid.flatten(1)[..., None]  # (B_mask, tokens, 1)
            grids[key] = grid
        if grid.shape[0] not in (1, x.shape[0]):
            raise ValueError(
                f"IP-Adapter mask batch {grid.shape[0]} does not fit the UNet batch {x.shape[0]}"
            )
        return x * grid


class ImageAttention(fl.Chain):
    """Attention of the block's query on the image tokens, through this block's `to_k_ip` / `to_v_ip`."""

    def __init__(
        self,
        context: str,
        inner_dim: int,
        context_dim: int,
        num_heads: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.context = context
        super().__init__(
            fl.Lambda(_query),
            fl.Parallel(
                fl.Identity(),
                fl.Chain(
                    fl.UseContext(context, "tokens"),
                    fl.Linear(context_dim, inner_dim, bias=False, device=device, dtype=dtype),
                ),
                fl.Chain(
                    fl.UseContext(context, "tokens"),
                    fl.Linear(context_dim, inner_dim, bias=False, device=device, dtype=dtype),
                ),
            ),
            fl.ScaledDotProductAttention(num_heads),
            ImageAttentionWeight(context),
        )

    def forward(self, *inputs: Any) -> Any:
        if self.use_context(self.context)["scale"] == 0:
            return 0.0  # the text attention alone, bit for bit
        return super().forward(*inputs)

    def load_key_value(self, key_weight: Tensor, value_weight: Tensor) -> None:
        """Take the block's `to_k_ip` / `to_v_ip` weights (assigned, not copied)."""
        key_linear, value_linear = (chain[1] for chain in list(self[1])[1:])  # type: ignore[index]
        key_linear.load_state_dict({"weight": key_weight}, assign=True)
        value_linear.load_state_dict({"weight": value_weight}, assign=True)


class ImageCrossAttention(fl.Sum, Adapter[fl.Module]):
    """IP-Adapter's decoupled cross-attention: the text attention (the target) plus the image attention."""

    def __init__(
        self,
        target: fl.Module,
        context: str,
        inner_dim: int,
        context_dim: int,
        num_heads: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        with self.setup_adapter(target):
            super().__init__(
                target, ImageAttention(context, inner_dim, context_dim, num_heads, device, dtype)
            )

    @property
    def image_attention(self) -> ImageAttention:
        """This adapter's own image branch (not one of an adapter it wraps)."""
        branch = list(self)[-1]
        assert isinstance(branch, ImageAttention)
        return branch


def _text_attention_slot(block: CrossAttentionBlock) -> tuple[fl.Attention, fl.Module]:
    """The block's attention and the child standing where its ScaledDotProductAttention is (maybe adapted)."""
    attention = block.ensure_find(fl.Attention)
    for child in attention:
        if isinstance(child, fl.ScaledDotProductAttention | ImageCrossAttention):
            return attention, child
    raise ValueError("a CrossAttentionBlock's attention has no ScaledDotProductAttention")


# -- the loaded model ---------------------------------------------------------------------------------------


def _family(context_dim: int) -> str:
    return FAMILIES.get(context_dim, f"a {context_dim}-wide text context")


class IPAdapterWeights(torch.nn.Module):
    """Every tensor of an IP-Adapter file in one module (its image projection and the `to_k_ip`/`to_v_ip` of each
    cross-attention block), so that the adapter moves between devices as one model."""

    def __init__(
        self,
        image_projection: ImageProjection | PerceiverResampler,
        key_value_weights: Sequence[tuple[Tensor, Tensor]],
    ) -> None:
        super().__init__()
        self.image_projection = image_projection
        self.to_k_ip = torch.nn.ParameterList(
            [torch.nn.Parameter(key, requires_grad=False) for key, _ in key_value_weights]
        )
        self.to_v_ip = torch.nn.ParameterList(
            [torch.nn.Parameter(value, requires_grad=False) for _, value in key_value_weights]
        )


class IPAdapter:
    """A loaded IP-Adapter file: its image projection and one `to_k_ip`/`to_v_ip` pair per cross-attention block.

    The tensors live in `weights` (a torch module: the host moves it to the UNet's device with the UNet).
    """

    def __init__(
        self,
        image_projection: ImageProjection | PerceiverResampler,
        key_value_weights: Sequence[tuple[Tensor, Tensor]],
        name: str = "ip-adapter",
    ) -> None:
        self.weights = IPAdapterWeights(image_projection, key_value_weights)
        self.name = name
        self.kind = BASE if isinstance(image_projection, ImageProjection) else PLUS
        self.context_dim = int(self.key_value_weights[0][0].shape[1])
        first = image_projection[0]
        assert isinstance(first, fl.Linear)
        self.image_input_dim = int(first.in_features)
        """Width the image encoder must give: projected embedding (base) or hidden state (plus)."""

    def __repr__(self) -> str:
        return (
            f"IPAdapter({self.name!r}, {self.kind}, {self.family}, {len(self.key_value_weights)} blocks, "
            f"{self.image_projection.num_tokens} tokens per image)"
        )

    @property
    def image_projection(self) -> ImageProjection | PerceiverResampler:
        return self.weights.image_projection  # type: ignore[return-value]

    @property
    def key_value_weights(self) -> list[tuple[Tensor, Tensor]]:
        """(to_k_ip, to_v_ip) of each cross-attention block, where the weights are now."""
        return list(zip(self.weights.to_k_ip, self.weights.to_v_ip))

    @property
    def family(self) -> str:
        """The model family its cross-attention context belongs to ("SD1.5", "SDXL", ...)."""
        return _family(self.context_dim)

    @property
    def encoder_name(self) -> str:
        names = ENCODERS_BY_EMBEDDING if self.kind == BASE else ENCODERS_BY_HIDDEN
        return names.get(self.image_input_dim, "a")

    def check_image_encoder(self, encoder: CLIPImageEncoder) -> None:
        """Refuse an image encoder of another width than this adapter was trained on."""
        config = encoder.config
        actual = config.projection_dim if self.kind == BASE else config.embedding_dim
        if actual == self.image_input_dim:
            return
        names = ENCODERS_BY_EMBEDDING if self.kind == BASE else ENCODERS_BY_HIDDEN
        what = "image embedding" if self.kind == BASE else "hidden state"
        raise ValueError(
            f"{self.name} expects a {names.get(self.image_input_dim, 'CLIP')} image encoder "
            f"({self.image_input_dim}-d {what}), got {names.get(actual, 'an encoder')} ({actual}-d)"
        )

    def check_unet(self, unet: UNet) -> None:
        """Refuse a UNet of another family, or whose cross-attention blocks do not match the adapter's."""
        blocks = cross_attention_blocks(unet)
        unet_context = unet.config.context_dim
        if unet_context != self.context_dim or len(blocks) != len(self.key_value_weights):
            raise ValueError(
                f"{self.name} is an IP-Adapter for {self.family} (context {self.context_dim}, "
                f"{len(self.key_value_weights)} cross-attention blocks); the model is {_family(unet_context)} "
                f"(context {unet_context}, {len(blocks)} cross-attention blocks)"
            )
        for index, (block, (key, _)) in enumerate(zip(blocks, self.key_value_weights)):
            attention, _ = _text_attention_slot(block)
            if tuple(key.shape) != (attention.inner_dim, self.context_dim):
                raise ValueError(
                    f"{self.name}: ip_adapter.{2 * index + 1}.to_k_ip is {tuple(key.shape)}, the model's "
                    f"cross-attention block {index} needs ({attention.inner_dim}, {self.context_dim})"
                )

    def encode_images(
        self,
        encoder: CLIPImageEncoder,
        images: Tensor,
        negative_images: Tensor | None = None,
    ) -> ImageEmbeddings:
        """CLIP embeddings of ComfyUI images (B, H, W, C), one per image, with their negatives."""
        self.check_image_encoder(encoder)
        device, dtype = compute_placement(encoder)
        size = encoder.config.image_size
        pixels = preprocess_images(images, size=size).to(device=device, dtype=dtype)
        with torch.no_grad():
            if self.kind == BASE:
                positive = encoder(pixels).float()
                negative = (
                    encoder(preprocess_images(negative_images, size=size).to(pixels)).float()
                    if negative_images is not None
                    else torch.zeros_like(positive)
                )
            else:
                hidden = CLIPImageHiddenState(encoder, layer=-2)
                positive = hidden(pixels).float()
                negative_pixels = (
                    preprocess_images(negative_images, size=size).to(pixels)
                    if negative_images is not None
                    else torch.zeros_like(pixels)
                )
                negative = hidden(negative_pixels).float()
        if negative.shape[0] not in (1, positive.shape[0]):
            raise ValueError(f"{negative.shape[0]} negative images for {positive.shape[0]} images")
        kind = IMAGE_EMBEDS if self.kind == BASE else PENULTIMATE
        return ImageEmbeddings(positive, negative.expand_as(positive).contiguous(), kind)

    def project(self, embeddings: Tensor) -> Tensor:
        """Image tokens (N, T, context_dim) of N image embeddings."""
        device, dtype = compute_placement(self.image_projection)
        with torch.no_grad():
            return self.image_projection(embeddings.to(device=device, dtype=dtype))

    def image_tokens(
        self,
        embeddings: ImageEmbeddings,
        weights: Sequence[float] | None = None,
        combine: str = "concat",
    ) -> tuple[Tensor, Tensor]:
        """(positive, negative) tokens (1, T', context_dim) of weighted, combined reference images."""
        expected = IMAGE_EMBEDS if self.kind == BASE else PENULTIMATE
        if embeddings.kind != expected:
            raise ValueError(f"{self.name} ({self.kind}) needs {expected}, got {embeddings.kind}")
        width = int(embeddings.positive.shape[-1])
        if width != self.image_input_dim:
            raise ValueError(
                f"{self.name} reads {self.image_input_dim}-d image embeddings ({self.encoder_name} image "
                f"encoder); these are {width}-d: encode the images with the encoder that pairs with it"
            )
        if combine not in COMBINE_MODES:
            raise ValueError(f"unknown combine mode {combine!r}; choose one of {', '.join(COMBINE_MODES)}")
        positive, negative = embeddings.positive, embeddings.negative
        count_ = positive.shape[0]
        if weights is not None:
            if len(weights) != count_:
                raise ValueError(f"{len(weights)} weights for {count_} reference images")
            factors = torch.tensor(list(weights), dtype=positive.dtype).view(-1, *[1] * (positive.dim() - 1))
            positive = positive * factors
        if combine == "average":
            positive, negative = positive.mean(0, keepdim=True), negative[:1]
        return (
            self.project(positive).flatten(0, 1)[None],
            self.project(negative).flatten(0, 1)[None],
        )

    def inject(self, unet: UNet) -> IPAdapterInjection:
        """Adapt every cross-attention block of `unet` (checked first: nothing is left half-applied)."""
        self.check_unet(unet)
        context = f"ip_adapter_{next(_INJECTION_IDS)}"
        injected: list[ImageCrossAttention] = []
        try:
            for block, (key, value) in zip(cross_attention_blocks(unet), self.key_value_weights):
                attention, slot = _text_attention_slot(block)
                adapter = ImageCrossAttention(
                    slot,
                    context,
                    attention.inner_dim,
                    self.context_dim,
                    attention.num_heads,
                    device="meta",
                )
                device, dtype = compute_placement(attention)
                adapter.image_attention.load_key_value(
                    key.to(device=device, dtype=dtype), value.to(device=device, dtype=dtype)
                )
                adapter.inject(attention)
                injected.append(adapter)
        except BaseException:
            for adapter in reversed(injected):
                adapter.eject()
            raise
        injection = IPAdapterInjection(unet, context, injected)
        unet.set_context(context, {"tokens": None, "scale": 1.0, "mask": None})
        return injection


_INJECTION_IDS = count()


class IPAdapterInjection:
    """An IP-Adapter injected in a UNet: set its tokens, scale and mask; `eject()` restores the UNet."""

    def __init__(self, unet: UNet, context: str, adapters: list[ImageCrossAttention]) -> None:
        self.unet = unet
        self.context = context
        self.adapters = adapters

    def _state(self) -> dict[str, Any]:
        return self.unet.use_context(self.context)

    def set_tokens(self, tokens: Tensor) -> None:
        """Image tokens for the UNet's batch (B, T, context_dim), e.g. `[negative, positive]` with guidance."""
        device, dtype = compute_placement(self.unet)
        self._state()["tokens"] = tokens.to(device=device, dtype=dtype)

    def set_scale(self, scale: float) -> None:
        """Weight of the image attention (0: exactly the model without adapter)."""
        self._state()["scale"] = scale

    def set_mask(self, mask: Tensor | None) -> None:
        """Where the adapter acts, (H, W) or (B, H, W) in 0..1 at any resolution; None: everywhere."""
        if mask is not None:
            mask = mask[None] if mask.dim() == 2 else mask
            if mask.dim() != 3:
                raise ValueError(f"an IP-Adapter mask is (H, W) or (B, H, W), got {tuple(mask.shape)}")
            mask = mask.float()
        self._state()["mask"] = mask
        self._state()["mask_grids"] = {}

    def eject(self) -> None:
        """Take every adapter out (in reverse order) and forget the context."""
        for adapter in reversed(self.adapters):
            adapter.eject()
        self.adapters = []
        self.unet.provider.contexts.pop(self.context, None)


# -- the sampling patch -------------------------------------------------------------------------------------


class IPAdapterPatch:
    """A `ModelPatch`: the IP-Adapter with its reference images for one sampling run.

    `scale` weights the image attention; `weights` one per reference image; `combine` "concat" or "average";
    it acts on steps whose progress `step / num_steps` lies in `[start, end)` (end 1: up to the last step);
    `mask` (H, W) or (B, H, W) restricts it to a region (see `regional`); with `keep_outside` the latents
    outside the mask end exactly as without the adapter.
    """

    def __init__(
        self,
        adapter: IPAdapter,
        embeddings: ImageEmbeddings,
        scale: float = 1.0,
        weights: Sequence[float] | None = None,
        combine: str = "concat",
        start: float = 0.0,
        end: float = 1.0,
        mask: Tensor | None = None,
        keep_outside: bool = False,
    ) -> None:
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"IP-Adapter start/end must satisfy 0 <= start <= end <= 1, got {start}, {end}")
        self.adapter = adapter
        self.embeddings = embeddings
        self.scale = scale
        self.weights = None if weights is None else list(weights)
        self.combine = combine
        self.start = start
        self.end = end
        self.mask = mask
        self.keep_outside = keep_outside
        self.tokens = adapter.image_tokens(embeddings, self.weights, combine)  # checks kind and mode early

    @staticmethod
    def from_images(
        adapter: IPAdapter,
        encoder: CLIPImageEncoder,
        images: Tensor,
        negative_images: Tensor | None = None,
        **options: Any,
    ) -> IPAdapterPatch:
        """Encode ComfyUI images (B, H, W, C) with `encoder` (checked against the adapter), then patch."""
        return IPAdapterPatch(adapter, adapter.encode_images(encoder, images, negative_images), **options)

    def models(self) -> tuple[IPAdapterWeights]:
        """The adapter's weights: brought to the run's device with the UNet (see `model_patch.patch_models`)."""
        return (self.adapter.weights,)

    @property
    def label(self) -> str:
        count_ = self.embeddings.positive.shape[0]
        window = "" if (self.start, self.end) == (0.0, 1.0) else f", steps {self.start:g}-{self.end:g}"
        masked = ", masked" if self.mask is not None else ""
        return f"IP-Adapter {self.adapter.name} ({count_} image(s), {self.combine}, scale {self.scale:g}{window}{masked})"

    def active(self, run: SamplingRun, step: int) -> bool:
        """Whether the adapter acts on `step` of `run`."""
        progress = run.progress(step)
        return self.start <= progress and (progress < self.end or self.end >= 1.0)

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Inject into `model.unet` with this run's batch layout; the undo ejects it.

        With a mask the adapter becomes a region of the run (see `regional`): the prediction outside the
        mask is the one without the adapter, and inside its pass the image attention is masked per block.
        """
        if run is None:
            return _nothing
        positive, negative = self.tokens
        batch = run.batch_size
        tokens = positive.expand(batch, -1, -1)
        if run.uses_guidance:
            tokens = torch.cat([negative.expand(batch, -1, -1), tokens])
        injection = self.adapter.inject(model.unet)
        region: Region | None = None
        hook: Callable[[int], None] | None = None
        batch_mask: Tensor | None = None

        def follow_halves(halves: Halves) -> None:  # a guidance pass on one half of the batch
            injection.set_tokens(select_halves(tokens, run.stored_halves, halves))
            if batch_mask is not None and batch_mask.shape[0] > 1:
                injection.set_mask(select_halves(batch_mask, run.stored_halves, halves))

        try:
            injection.set_tokens(tokens)
            if self.mask is not None:
                mask = self.mask[None] if self.mask.dim() == 2 else self.mask
                batch_mask = torch.cat([mask, mask]) if run.uses_guidance and mask.shape[0] > 1 else mask
                injection.set_mask(batch_mask)
                injection.set_scale(0.0)
                region = Region(
                    new_region_name(f"ip-adapter {self.adapter.name}"),
                    latent_region_mask(mask, run.latent_height, run.latent_width),
                    self.start,
                    self.end,
                    switch=lambda on: injection.set_scale(self.scale if on else 0.0),
                    keep_outside=self.keep_outside,
                )
                run.regions.append(region)
            else:

                def hook(step: int) -> None:
                    injection.set_scale(self.scale if self.active(run, step) else 0.0)

                hook(run.first_step)
                run.on_step(hook)
            run.on_halves(follow_halves)
        except BaseException:
            injection.eject()
            raise

        def undo() -> None:
            if follow_halves in run.halves_listeners:
                run.halves_listeners.remove(follow_halves)
            if region is not None and region in run.regions:
                run.regions.remove(region)
            if hook is not None and hook in run.step_hooks:
                run.step_hooks.remove(hook)
            injection.eject()

        return undo


def _nothing() -> None:
    return None


def iter_ip_adapters(unet: UNet) -> Iterator[ImageCrossAttention]:
    """The IP-Adapter blocks currently injected in `unet`."""
    yield from unet.layers(ImageCrossAttention, recurse=True)
