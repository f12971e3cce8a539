"""The Stable Diffusion UNet (SD1.5, SD1.5-inpainting, SDXL) declared as a tree of fluxion layers.

Data reaches the blocks through contexts, set by the UNet's methods before calling `unet(x)`:

- "diffusion" {"timestep"}: `set_timestep`, read by the `TimestepEncoder`;
- "cross_attention_block" {"clip_text_embedding"}: `set_clip_text_embedding`, read by every
  `CrossAttentionBlock` (its `fl.Attention` gets the text as key and value through `UseContext`);
- "sdxl" {"pooled_text_embedding", "time_ids"}: SDXL only, read by the `TextTimeEmbedding`;
- "range_adapter" {"timestep_embedding"}: written by the `TimestepEncoder`, read by every
  `RangeAdapter2d` (the timestep injection of a `ResidualBlock`);
- "unet" {"residuals", "control_residuals"}: the skip connections (index i = i-th
  `ResidualAccumulator` of `DownBlocks`, read back by the `ResidualConcatenator`s of `UpBlocks`)
  and what ControlNet-like adapters add to them: `control_residuals[i]` is added to skip i before it
  is stored, `control_residuals[-1]` to the middle block's output (0.0 by default, see
  `set_control_residuals`).

The tree mirrors the original LDM layout: `DownBlocks` has one child Chain per `input_blocks.i`,
`UpBlocks` one per `output_blocks.i`, so key maps stay simple tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ...fluxion import layers as fl
from ...fluxion.compile import compile_blocks
from .model_config import SD15_UNET, UNetConfig


class SinusoidalEmbedding(fl.Module):
    """Sinusoidal features of a value: `[cos(t * f_i), sin(t * f_i)]`, `f_i = 10000 ** (-i / (dim / 2))`.

    Maps a tensor of any shape to `(*shape, dim)`, computed in float32 (diffusers' `Timesteps` with
    `flip_sin_to_cos=True, downscale_freq_shift=0`).
    """

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period

    def forward(self, values: Tensor) -> Tensor:
        half = self.dim // 2
        exponent = -math.log(self.max_period) * torch.arange(half, dtype=torch.float32, device=values.device)
        frequencies = torch.exp(exponent / half)
        angles = values.float()[..., None] * frequencies
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class RangeEncoder(fl.Chain):
    """The MLP lifting sinusoidal features to an embedding: Linear, SiLU, Linear (in the weights' dtype)."""

    def __init__(
        self, in_dim: int, out_dim: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Converter(),
            fl.Linear(in_dim, out_dim, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Linear(out_dim, out_dim, device=device, dtype=dtype),
        )


class TextTimeEmbedding(fl.Residual):
    """SDXL's additional embedding: pooled text and sinusoidal time ids, encoded and added to the timestep's."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.Concatenate(
                fl.UseContext("sdxl", "pooled_text_embedding"),
                fl.Chain(
                    fl.UseContext("sdxl", "time_ids"),
                    SinusoidalEmbedding(config.time_id_embedding_dim),
                    fl.Flatten(1),
                ),
                dim=1,
            ),
            RangeEncoder(config.addition_embedding_dim, config.timestep_embedding_dim, device, dtype),
        )


def _as_batch(values: Tensor) -> Tensor:
    return values.reshape(-1)


class TimestepEncoder(fl.Passthrough):
    """Embeds the timestep (plus SDXL's text_time embedding) into context "range_adapter"."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        layers: list[fl.Module] = [
            fl.UseContext("diffusion", "timestep").compose(_as_batch),
            SinusoidalEmbedding(config.block_channels[0]),
            RangeEncoder(config.block_channels[0], config.timestep_embedding_dim, device, dtype),
        ]
        if config.addition_embedding == "text_time":
            layers.append(TextTimeEmbedding(config, device, dtype))
        layers.append(fl.SetContext("range_adapter", "timestep_embedding"))
        super().__init__(*layers)


class RangeAdapter2d(fl.Sum):
    """Adds the projected timestep embedding to every position of a feature map."""

    def __init__(
        self,
        channels: int,
        embedding_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.Identity(),
            fl.Chain(
                fl.UseContext("range_adapter", "timestep_embedding"),
                fl.SiLU(),
                fl.Linear(embedding_dim, channels, device=device, dtype=dtype),
                fl.Unsqueeze(-1),
                fl.Unsqueeze(-1),
            ),
        )


class ResidualBlock(fl.Sum):
    """GroupNorm, SiLU, 3x3 conv (+ timestep), GroupNorm, SiLU, 3x3 conv; plus a (1x1 conv) shortcut."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        timestep_embedding_dim: int | None = None,
        num_groups: int = 32,
        eps: float = 1e-5,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        main: list[fl.Module] = [
            fl.GroupNorm(in_channels, num_groups, eps=eps, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(in_channels, out_channels, 3, padding=1, device=device, dtype=dtype),
        ]
        if timestep_embedding_dim is not None:
            main.append(RangeAdapter2d(out_channels, timestep_embedding_dim, device, dtype))
        main += [
            fl.GroupNorm(out_channels, num_groups, eps=eps, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(out_channels, out_channels, 3, padding=1, device=device, dtype=dtype),
        ]
        shortcut: fl.Module = (
            fl.Identity()
            if in_channels == out_channels
            else fl.Conv2d(in_channels, out_channels, 1, device=device, dtype=dtype)
        )
        super().__init__(fl.Chain(*main), shortcut)


class SelfAttentionBlock(fl.Residual):
    """LayerNorm then multi-head self-attention over the tokens (reference-only adapters patch this)."""

    def __init__(
        self, channels: int, num_heads: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.LayerNorm(channels, device=device, dtype=dtype),
            fl.SelfAttention(channels, num_heads, use_bias=False, device=device, dtype=dtype),
        )


class CrossAttentionBlock(fl.Residual):
    """LayerNorm then attention from the tokens to the text embedding (IP-Adapter patches its key/value)."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            fl.LayerNorm(channels, device=device, dtype=dtype),
            fl.Parallel(
                fl.Identity(),
                fl.UseContext("cross_attention_block", "clip_text_embedding"),
                fl.UseContext("cross_attention_block", "clip_text_embedding"),
            ),
            fl.Attention(
                channels,
                num_heads,
                key_embedding_dim=context_dim,
                value_embedding_dim=context_dim,
                use_bias=False,
                device=device,
                dtype=dtype,
            ),
        )


class FeedForward(fl.Residual):
    """LayerNorm then a GEGLU MLP (width x4)."""

    def __init__(self, channels: int, device: Device | str | None = None, dtype: DType | None = None) -> None:
        super().__init__(
            fl.LayerNorm(channels, device=device, dtype=dtype),
            fl.Linear(channels, 8 * channels, device=device, dtype=dtype),
            fl.GLU(fl.GeLU()),
            fl.Linear(4 * channels, channels, device=device, dtype=dtype),
        )


class TransformerBlock(fl.Chain):
    """Self-attention, cross-attention on the text, feed-forward: each a residual on the tokens."""

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        super().__init__(
            SelfAttentionBlock(channels, num_heads, device, dtype),
            CrossAttentionBlock(channels, num_heads, context_dim, device, dtype),
            FeedForward(channels, device, dtype),
        )


def _tokens_to_image(tokens: Tensor, image: Tensor) -> Tensor:
    # contiguous in the image's own layout: a strided view here would send every later convolution down
    # oneDNN's channels-last path with NCHW weights, which reorders them on each call (see fl.image_layout)
    return tokens.transpose(1, 2).reshape(image.shape).contiguous(memory_format=fl.image_layout(image))


class CrossAttentionBlock2d(fl.Residual):
    """The spatial transformer: GroupNorm, projection in, `TransformerBlock`s on the pixels as tokens, projection out.

    Projections are 1x1 convolutions (SD1.5) or Linear layers on the tokens (SDXL).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int,
        context_dim: int,
        depth: int = 1,
        use_linear_projection: bool = False,
        num_groups: int = 32,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        def projection() -> fl.Module:
            if use_linear_projection:
                return fl.Linear(channels, channels, device=device, dtype=dtype)
            return fl.Conv2d(channels, channels, 1, device=device, dtype=dtype)

        to_tokens: list[fl.Module] = [fl.Flatten(2), fl.Transpose(1, 2)]
        to_image: list[fl.Module] = [
            fl.Parallel(fl.Identity(), fl.UseContext("spatial_transformer", "image")),
            fl.Lambda(_tokens_to_image),
        ]
        blocks = [TransformerBlock(channels, num_heads, context_dim, device, dtype) for _ in range(depth)]
        inner = (
            [*to_tokens, projection(), *blocks, projection(), *to_image]
            if use_linear_projection
            else [projection(), *to_tokens, *blocks, *to_image, projection()]
        )
        super().__init__(
            fl.SetContext("spatial_transformer", "image"),
            fl.GroupNorm(channels, num_groups, eps=1e-6, device=device, dtype=dtype),
            *inner,
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {"spatial_transformer": {"image": None}}


class ControlResidual(fl.Residual):
    """Adds `control_residuals[index]` of context "unet" (0.0 unless a ControlNet-like adapter set it)."""

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(fl.UseContext("unet", "control_residuals").compose(itemgetter(index)))


class ResidualAccumulator(fl.Passthrough):
    """Stores its input (plus any control residual) as skip connection `index`; passes the input on unchanged."""

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(ControlResidual(index), fl.SetContext("unet", "residuals", callback=self.store))

    def store(self, residuals: list[Tensor | None], x: Tensor) -> None:
        """Put `x` at this accumulator's place in the list of skip connections."""
        residuals[self.index] = x


class ResidualConcatenator(fl.Concatenate):
    """Concatenates skip connection `index` to the input, along the channels."""

    def __init__(self, index: int) -> None:
        self.index = index
        super().__init__(fl.Identity(), fl.UseContext("unet", "residuals").compose(itemgetter(index)), dim=1)


def skip_channels(config: UNetConfig) -> list[int]:
    """Channels of every skip connection, in the order `DownBlocks` stores them."""
    channels = [config.block_channels[0]]
    for level, width in enumerate(config.block_channels):
        channels += [width] * config.layers_per_block
        if level < len(config.block_channels) - 1:
            channels.append(width)
    return channels


class DownBlocks(fl.Chain):
    """The encoder half: one child per LDM input block (conv in, residual(+attention) layers, downsamplers)."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        temb = config.timestep_embedding_dim
        blocks: list[fl.Chain] = [
            fl.Chain(
                fl.Conv2d(
                    config.in_channels, config.block_channels[0], 3, padding=1, device=device, dtype=dtype
                )
            )
        ]
        previous = config.block_channels[0]
        for level, width in enumerate(config.block_channels):
            depth = config.transformer_depth[level]
            for _ in range(config.layers_per_block):
                layers: list[fl.Module] = [
                    ResidualBlock(previous, width, temb, config.num_groups, device=device, dtype=dtype)
                ]
                if depth > 0:
                    layers.append(_transformer(config, width, depth, device, dtype))
                blocks.append(fl.Chain(*layers))
                previous = width
            if level < len(config.block_channels) - 1:
                blocks.append(fl.Chain(fl.Downsample(width, padding=1, device=device, dtype=dtype)))
        for index, block in enumerate(blocks):
            block.append(ResidualAccumulator(index))
        super().__init__(*blocks)


def _transformer(
    config: UNetConfig, channels: int, depth: int, device: Device | str | None, dtype: DType | None
) -> CrossAttentionBlock2d:
    return CrossAttentionBlock2d(
        channels,
        config.heads(channels),
        config.context_dim,
        depth=depth,
        use_linear_projection=config.use_linear_projection,
        num_groups=config.num_groups,
        device=device,
        dtype=dtype,
    )


class MiddleBlock(fl.Chain):
    """Residual block, spatial transformer, residual block at the lowest resolution."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        width, temb = config.block_channels[-1], config.timestep_embedding_dim
        super().__init__(
            ResidualBlock(width, width, temb, config.num_groups, device=device, dtype=dtype),
            _transformer(config, width, config.middle_transformer_depth, device, dtype),
            ResidualBlock(width, width, temb, config.num_groups, device=device, dtype=dtype),
        )


class UpBlocks(fl.Chain):
    """The decoder half: one child per LDM output block (skip concatenation, residual(+attention), upsampler)."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        temb = config.timestep_embedding_dim
        skips = skip_channels(config)
        blocks: list[fl.Chain] = []
        previous = config.block_channels[-1]
        for level in reversed(range(len(config.block_channels))):
            width, depth = config.block_channels[level], config.transformer_depth[level]
            for layer in range(config.layers_per_block + 1):
                index = len(skips) - 1 - len(blocks)
                layers: list[fl.Module] = [
                    ResidualConcatenator(index),
                    ResidualBlock(
                        previous + skips[index], width, temb, config.num_groups, device=device, dtype=dtype
                    ),
                ]
                if depth > 0:
                    layers.append(_transformer(config, width, depth, device, dtype))
                if level > 0 and layer == config.layers_per_block:
                    layers.append(fl.Upsample(width, device=device, dtype=dtype))
                blocks.append(fl.Chain(*layers))
                previous = width
        super().__init__(*blocks)


class OutputBlock(fl.Chain):
    """GroupNorm, SiLU and a 3x3 convolution to the predicted noise."""

    def __init__(
        self, config: UNetConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        width = config.block_channels[0]
        super().__init__(
            fl.GroupNorm(width, config.num_groups, device=device, dtype=dtype),
            fl.SiLU(),
            fl.Conv2d(width, config.out_channels, 3, padding=1, device=device, dtype=dtype),
        )


class UNet(fl.Chain):
    """Stable Diffusion's noise-prediction UNet: set the timestep and text, then `unet(latents)` -> noise."""

    def __init__(
        self,
        config: UNetConfig = SD15_UNET,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config
        self.skip_connection_count = len(skip_channels(config))
        super().__init__(
            TimestepEncoder(config, device, dtype),
            DownBlocks(config, device, dtype),
            MiddleBlock(config, device, dtype),
            ControlResidual(self.skip_connection_count),
            UpBlocks(config, device, dtype),
            OutputBlock(config, device, dtype),
        )

    def init_context(self) -> dict[str, dict[str, Any]]:
        return {
            "unet": {
                "residuals": [None] * self.skip_connection_count,
                "control_residuals": [0.0] * (self.skip_connection_count + 1),
            },
            "diffusion": {},
            "cross_attention_block": {},
            "range_adapter": {},
            "sampling": {"shapes": []},
            "sdxl": {},
        }

    def set_timestep(self, timestep: Tensor | float | int) -> None:
        """The diffusion timestep(s): a number, or one per batch item."""
        self.set_context("diffusion", {"timestep": torch.as_tensor(timestep)})

    def set_clip_text_embedding(self, embedding: Tensor) -> None:
        """The text encoder's hidden states (B, tokens, context_dim) that cross-attention reads."""
        self.set_context("cross_attention_block", {"clip_text_embedding": embedding})

    def set_pooled_text_embedding(self, pooled: Tensor) -> None:
        """SDXL: the pooled (projected) text embedding of the second text encoder, (B, pooled_text_dim)."""
        self._require_text_time("set_pooled_text_embedding")
        self.use_context("sdxl")["pooled_text_embedding"] = pooled

    def set_time_ids(self, time_ids: Tensor) -> None:
        """SDXL: (B, 6) original size, crop top-left and target size, as in diffusers' `add_time_ids`."""
        self._require_text_time("set_time_ids")
        self.use_context("sdxl")["time_ids"] = time_ids

    def set_control_residuals(self, residuals: Sequence[Tensor | float] | None) -> None:
        """What to add to each skip connection and (last item) to the middle block output; None resets to 0."""
        count = self.skip_connection_count + 1
        if residuals is None:
            residuals = [0.0] * count
        if len(residuals) != count:
            raise ValueError(f"expected {count} control residuals (skips + middle), got {len(residuals)}")
        self.use_context("unet")["control_residuals"] = list(residuals)

    def _require_text_time(self, method: str) -> None:
        if self.config.addition_embedding != "text_time":
            raise ValueError(f"{method}: this UNet has no text_time embedding (only SDXL-like configs do)")


def cross_attention_blocks(unet: UNet, block_type: type[fl.Module] = CrossAttentionBlock) -> list[Any]:
    """Blocks of a type in diffusers' processor order (down, up, middle): the order of IP-Adapter files."""
    sections = [unet.ensure_find(DownBlocks), unet.ensure_find(UpBlocks), unet.ensure_find(MiddleBlock)]
    return [block for section in sections for block in section.layers(block_type)]


HEAVY_BLOCKS: tuple[type[fl.Module], ...] = (ResidualBlock, CrossAttentionBlock2d)
"""The UNet's blocks that `compile_unet` compiles: ResNet blocks and spatial transformers."""


def compile_unet(unet: UNet, **options: Any) -> list[torch.nn.Module]:
    """Opt-in: `torch.compile` the UNet's heavy blocks in place (see `fluxion.compile`); `uncompile` undoes it.

    Adapters injected or ejected afterwards are picked up (the touched blocks recompile); `options`
    go to `torch.compile` (default backend: inductor, which needs a C++ compiler on CPU). Defaults,
    measured on the SD1.5 UNet (CPU, 32² latent, batch 2, vs diffusers eager): static shapes and
    inductor's `layout_optimization` off, 1.00× (with it on, inductor converts convolutions to
    channels-last around every call: 1.28×).
    """
    options.setdefault("dynamic", False)
    if options.get("backend", "inductor") == "inductor" and "mode" not in options:
        options.setdefault("options", {"layout_optimization": False})
    return compile_blocks(unet, HEAVY_BLOCKS, **options)
