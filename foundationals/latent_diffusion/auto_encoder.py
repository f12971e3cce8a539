"""Stable Diffusion's KL autoencoder: images in [-1, 1] <-> scaled latents, whole or in blended tiles."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch import device as Device
from torch import dtype as DType

from ...fluxion import layers as fl
from .model_config import SD15_AUTOENCODER, AutoencoderConfig
from .unet import ResidualBlock

_EPS = 1e-6


class AttentionBlock2d(fl.Residual):
    """GroupNorm then single-head self-attention over the positions of the feature map."""

    def __init__(
        self, channels: int, num_groups: int, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        super().__init__(
            fl.GroupNorm(channels, num_groups, eps=_EPS, device=device, dtype=dtype),
            fl.SelfAttention2d(channels, num_heads=1, device=device, dtype=dtype),
        )


def _middle(channels: int, groups: int, device: Device | str | None, dtype: DType | None) -> fl.Chain:
    return fl.Chain(
        ResidualBlock(channels, channels, num_groups=groups, eps=_EPS, device=device, dtype=dtype),
        AttentionBlock2d(channels, groups, device, dtype),
        ResidualBlock(channels, channels, num_groups=groups, eps=_EPS, device=device, dtype=dtype),
    )


def _output(
    in_channels: int, out_channels: int, groups: int, device: Device | str | None, dtype: DType | None
) -> fl.Chain:
    return fl.Chain(
        fl.GroupNorm(in_channels, groups, eps=_EPS, device=device, dtype=dtype),
        fl.SiLU(),
        fl.Conv2d(in_channels, out_channels, 3, padding=1, device=device, dtype=dtype),
    )


class Encoder(fl.Chain):
    """Image -> posterior moments (mean and log-variance, 2 x latent channels) at 1/downscale_factor the size."""

    def __init__(
        self, config: AutoencoderConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        channels, groups = config.block_channels, config.num_groups
        levels: list[fl.Chain] = []
        previous = channels[0]
        for level, width in enumerate(channels):
            layers: list[fl.Module] = []
            for _ in range(config.layers_per_block):
                layers.append(
                    ResidualBlock(previous, width, num_groups=groups, eps=_EPS, device=device, dtype=dtype)
                )
                previous = width
            if level < len(channels) - 1:
                layers.append(
                    fl.Downsample(width, padding=0, register_shape=False, device=device, dtype=dtype)
                )
            levels.append(fl.Chain(*layers))
        moments = 2 * config.latent_channels
        super().__init__(
            fl.Conv2d(config.image_channels, channels[0], 3, padding=1, device=device, dtype=dtype),
            *levels,
            _middle(channels[-1], groups, device, dtype),
            _output(channels[-1], moments, groups, device, dtype),
            fl.Conv2d(moments, moments, 1, device=device, dtype=dtype),
        )


class Decoder(fl.Chain):
    """Latents (unscaled) -> image in about [-1, 1]."""

    def __init__(
        self, config: AutoencoderConfig, device: Device | str | None = None, dtype: DType | None = None
    ) -> None:
        channels, groups = config.block_channels, config.num_groups
        levels: list[fl.Chain] = []
        previous = channels[-1]
        for level in reversed(range(len(channels))):
            width = channels[level]
            layers: list[fl.Module] = []
            for _ in range(config.layers_per_block + 1):
                layers.append(
                    ResidualBlock(previous, width, num_groups=groups, eps=_EPS, device=device, dtype=dtype)
                )
                previous = width
            if level > 0:
                layers.append(fl.Upsample(width, upsample_factor=2, device=device, dtype=dtype))
            levels.append(fl.Chain(*layers))
        latent = config.latent_channels
        super().__init__(
            fl.Conv2d(latent, latent, 1, device=device, dtype=dtype),
            fl.Conv2d(latent, channels[-1], 3, padding=1, device=device, dtype=dtype),
            _middle(channels[-1], groups, device, dtype),
            *levels,
            _output(channels[0], config.image_channels, groups, device, dtype),
        )


class LatentDiffusionAutoencoder(fl.Chain):
    """Encoder, posterior mean, Decoder: calling it reconstructs an image; `encode`/`decode` work in scaled latents.

    `encode` returns `scaling_factor * z` where z is the posterior mean (diffusers' `latent_dist.mode()`),
    or, given a generator, a sample `mean + std * noise` drawn exactly as diffusers'
    `retrieve_latents(..., generator, sample_mode="sample")` does (img2img).
    """

    def __init__(
        self,
        config: AutoencoderConfig = SD15_AUTOENCODER,
        device: Device | str | None = None,
        dtype: DType | None = None,
    ) -> None:
        self.config = config
        super().__init__(
            Encoder(config, device, dtype),
            fl.Slicing(dim=1, end=config.latent_channels),
            Decoder(config, device, dtype),
        )

    @property
    def scaling_factor(self) -> float:
        """Latents are multiplied by this after encoding (0.18215 for SD1.5, 0.13025 for SDXL)."""
        return self.config.scaling_factor

    def encode(self, image: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scaled latents; the posterior mean, or a sample with `generator`."""
        return self._latents_from_moments(self.ensure_find(Encoder)(self._as_weights(image)), generator)

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> image in about [-1, 1]."""
        return self.ensure_find(Decoder)(self._as_weights(latents) / self.scaling_factor)

    def tiled_encode(
        self,
        image: Tensor,
        tile_size: int = 64,
        overlap: int = 16,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """`encode` in overlapping tiles (sizes in latent units) whose moments are blended linearly."""
        factor = self.config.downscale_factor
        if image.shape[-2] % factor or image.shape[-1] % factor:
            raise ValueError(f"image size {tuple(image.shape[-2:])} must be a multiple of {factor}")
        moments = _blend_tiles(
            self.ensure_find(Encoder), self._as_weights(image), tile_size, overlap, factor, 1
        )
        return self._latents_from_moments(moments, generator)

    def tiled_decode(self, latents: Tensor, tile_size: int = 64, overlap: int = 16) -> Tensor:
        """`decode` in overlapping tiles (sizes in latent units), blended with linear feathering."""
        decoder = self.ensure_find(Decoder)
        return _blend_tiles(
            decoder,
            self._as_weights(latents) / self.scaling_factor,
            tile_size,
            overlap,
            1,
            self.config.downscale_factor,
        )

    def _as_weights(self, x: Tensor) -> Tensor:
        return x.to(device=self.device, dtype=self.dtype)

    def _latents_from_moments(self, moments: Tensor, generator: torch.Generator | None) -> Tensor:
        mean, log_variance = moments.chunk(2, dim=1)
        if generator is None:
            return mean * self.scaling_factor
        std = torch.exp(0.5 * log_variance.clamp(-30.0, 20.0))
        noise = torch.randn(mean.shape, generator=generator, device=generator.device, dtype=mean.dtype)
        return (mean + std * noise.to(mean.device)) * self.scaling_factor


def _tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Tile positions covering `length`: a stride of `tile - overlap`, the last tile flush with the end."""
    if length <= tile:
        return [0]
    if overlap >= tile:
        raise ValueError(f"overlap {overlap} must be smaller than the tile size {tile}")
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def _feather(size: int, ramp: int, fade_in: bool, fade_out: bool, like: Tensor) -> Tensor:
    """1-D weights: 1 inside, linear ramps of `ramp` samples on the sides that overlap a neighbour."""
    weights = torch.ones(size, dtype=like.dtype, device=like.device)
    ramp = min(ramp, size)
    steps = torch.arange(1, ramp + 1, dtype=like.dtype, device=like.device) / (ramp + 1)
    if fade_in and ramp > 0:
        weights[:ramp] = torch.minimum(weights[:ramp], steps)
    if fade_out and ramp > 0:
        weights[size - ramp :] = torch.minimum(weights[size - ramp :], steps.flip(0))
    return weights


def _blend_tiles(
    process: Callable[[Tensor], Tensor], x: Tensor, tile: int, overlap: int, in_scale: int, out_scale: int
) -> Tensor:
    """Run `process` on overlapping tiles of x and blend the outputs with linear feathering.

    Positions are in latent units; one latent is `in_scale` input and `out_scale` output samples.
    Overlapping outputs are averaged with weights that ramp linearly across the overlap, so the
    result has no seams.
    """
    height, width = x.shape[-2] // in_scale, x.shape[-1] // in_scale
    output: Tensor | None = None
    total: Tensor | None = None
    rows, columns = _tile_starts(height, tile, overlap), _tile_starts(width, tile, overlap)
    for top in rows:
        for left in columns:
            tile_h, tile_w = min(tile, height), min(tile, width)
            piece = process(
                x[
                    ...,
                    top * in_scale : (top + tile_h) * in_scale,
                    left * in_scale : (left + tile_w) * in_scale,
                ]
            )
            if output is None or total is None:
                shape = (*piece.shape[:-2], height * out_scale, width * out_scale)
                output = torch.zeros(shape, dtype=piece.dtype, device=piece.device)
                total = torch.zeros(shape[-2:], dtype=piece.dtype, device=piece.device)
            ramp = overlap * out_scale
            weight = _feather(piece.shape[-2], ramp, top > 0, top + tile_h < height, piece)[
                :, None
            ] * _feather(piece.shape[-1], ramp, left > 0, left + tile_w < width, piece)
            rows_out = slice(top * out_scale, top * out_scale + piece.shape[-2])
            columns_out = slice(left * out_scale, left * out_scale + piece.shape[-1])
            output[..., rows_out, columns_out] += piece * weight
            total[rows_out, columns_out] += weight
    assert output is not None and total is not None
    return output / total


def encode_retrying_in_float32(
    autoencoder: LatentDiffusionAutoencoder, image: Tensor, generator: torch.Generator | None = None
) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> scaled latents (posterior mean, or a sample with `generator`).

    An fp16 autoencoder whose result overflows (SDXL's does) runs again in fp32, the generator rewound
    so that the sample comes from the same place in its stream.
    """
    state = generator.get_state() if generator is not None else None
    with torch.no_grad():
        latents = autoencoder.encode(image * 2 - 1, generator=generator)
        if _overflowed(autoencoder, latents):
            if generator is not None and state is not None:
                generator.set_state(state)
            latents = _float32_copy(autoencoder).encode(image.float() * 2 - 1, generator=generator)
    return latents.float()


def decode_retrying_in_float32(autoencoder: LatentDiffusionAutoencoder, latents: Tensor) -> Tensor:
    """Scaled latents -> (B, 3, H, W) in [0, 1].

    SDXL's autoencoder overflows in fp16: when an fp16 decode gives NaN or inf, it is decoded again by
    an fp32 copy of the autoencoder (the shared model is left as it is), as diffusers' `force_upcast`.
    """
    with torch.no_grad():
        image = autoencoder.decode(latents)
        if _overflowed(autoencoder, image):
            image = _float32_copy(autoencoder).decode(latents.float())
    return (image.float() / 2 + 0.5).clamp(0, 1)


def _overflowed(autoencoder: LatentDiffusionAutoencoder, result: Tensor) -> bool:
    """Whether an fp16 autoencoder's result holds NaN or inf (fp16 tops out at 65504)."""
    return autoencoder.dtype == torch.float16 and not bool(result.isfinite().all())


def _float32_copy(autoencoder: LatentDiffusionAutoencoder) -> LatentDiffusionAutoencoder:
    """A float32 autoencoder on the same device with the same weights, built on meta: no random init."""
    copy = LatentDiffusionAutoencoder(autoencoder.config, device="meta")
    weights = {key: value.float() for key, value in autoencoder.state_dict().items()}
    copy.load_state_dict(weights, assign=True)
    return copy
