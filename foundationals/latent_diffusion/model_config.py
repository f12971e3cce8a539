"""Configs of the latent-diffusion UNet and autoencoder, with presets for the real models and tiny ones for tests.

Presets are data: `UNET_PRESETS["sd15"]`, `AUTOENCODER_PRESETS["sdxl"]`, ... Every field is something a
checkpoint's keys and shapes reveal, so a config can also be inferred from a file (see `checkpoint.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class UNetConfig:
    """A Stable Diffusion UNet: channels per resolution level, depth of the transformers, text context.

    `transformer_depth[i]` is the number of `TransformerBlock`s at level i (0: no attention there).
    Heads: `attention_head_dim` when set (SDXL: heads = channels // 64), else `num_attention_heads`
    at every level (SD1.5: 8). `addition_embedding="text_time"` is SDXL's embedding of the pooled
    text embedding and the 6 size/crop "time ids", added to the timestep embedding.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    middle_transformer_depth: int = 1
    num_attention_heads: int = 8
    attention_head_dim: int | None = None
    context_dim: int = 768
    use_linear_projection: bool = False
    num_groups: int = 32
    addition_embedding: str | None = None
    pooled_text_dim: int = 1280
    time_ids_count: int = 6
    time_id_embedding_dim: int = 256

    def __post_init__(self) -> None:
        if len(self.transformer_depth) != len(self.block_channels):
            raise ValueError(
                f"transformer_depth {self.transformer_depth} needs one entry per level of {self.block_channels}"
            )
        if self.addition_embedding not in (None, "text_time"):
            raise ValueError(
                f"unsupported addition_embedding {self.addition_embedding!r} (None or 'text_time')"
            )

    @property
    def timestep_embedding_dim(self) -> int:
        """Width of the timestep embedding fed to every residual block (4x the first level's channels)."""
        return 4 * self.block_channels[0]

    @property
    def addition_embedding_dim(self) -> int:
        """Input width of SDXL's text_time embedding: pooled text then sinusoidal time ids."""
        return self.pooled_text_dim + self.time_ids_count * self.time_id_embedding_dim

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer working on `channels` features."""
        if self.attention_head_dim is not None:
            return channels // self.attention_head_dim
        return self.num_attention_heads

    def with_changes(self, **changes: object) -> UNetConfig:
        """A copy with some fields replaced (e.g. `in_channels=9` for inpainting)."""
        return replace(self, **changes)  # type: ignore[arg-type]


SD15_UNET = UNetConfig()
SD15_INPAINTING_UNET = SD15_UNET.with_changes(in_channels=9)
SDXL_BASE_UNET = UNetConfig(
    block_channels=(320, 640, 1280),
    transformer_depth=(0, 2, 10),
    middle_transformer_depth=10,
    attention_head_dim=64,
    context_dim=2048,
    use_linear_projection=True,
    addition_embedding="text_time",
    pooled_text_dim=1280,
)
TINY_UNET = UNetConfig(
    block_channels=(32, 64, 64),
    transformer_depth=(1, 1, 0),
    num_attention_heads=2,
    context_dim=32,
)
TINY_SDXL_UNET = UNetConfig(
    block_channels=(32, 64, 64),
    transformer_depth=(0, 1, 2),
    middle_transformer_depth=2,
    attention_head_dim=16,
    context_dim=48,
    use_linear_projection=True,
    addition_embedding="text_time",
    pooled_text_dim=40,
    time_id_embedding_dim=8,
)

UNET_PRESETS: dict[str, UNetConfig] = {
    "sd15": SD15_UNET,
    "sd15_inpainting": SD15_INPAINTING_UNET,
    "sdxl_base": SDXL_BASE_UNET,
    "tiny": TINY_UNET,
    "tiny_sdxl": TINY_SDXL_UNET,
}


@dataclass(frozen=True)
class AutoencoderConfig:
    """The KL autoencoder of Stable Diffusion: image <-> latents, 2**(levels-1) times smaller."""

    image_channels: int = 3
    latent_channels: int = 4
    block_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    num_groups: int = 32
    scaling_factor: float = 0.18215

    @property
    def downscale_factor(self) -> int:
        """How many pixels one latent covers along each side."""
        return 2 ** (len(self.block_channels) - 1)

    def with_changes(self, **changes: object) -> AutoencoderConfig:
        """A copy with some fields replaced."""
        return replace(self, **changes)  # type: ignore[arg-type]


SD15_AUTOENCODER = AutoencoderConfig()
SDXL_AUTOENCODER = AutoencoderConfig(scaling_factor=0.13025)
TINY_AUTOENCODER = AutoencoderConfig(block_channels=(32, 32, 64), layers_per_block=1)
# Tiny, but downscaling by 8 like the real ones (ComfyUI's latent nodes assume 8): the demo's checkpoints.
TINY_8X_AUTOENCODER = AutoencoderConfig(block_channels=(32, 32, 32, 32), layers_per_block=1)

AUTOENCODER_PRESETS: dict[str, AutoencoderConfig] = {
    "sd15": SD15_AUTOENCODER,
    "sdxl": SDXL_AUTOENCODER,
    "tiny_8x": TINY_8X_AUTOENCODER,
    "tiny": TINY_AUTOENCODER,
}


def unet_family(config: UNetConfig) -> str:
    """SD1.5, SD2.x or SDXL, from a UNet config (the name error messages use)."""
    if config.addition_embedding == "text_time":
        return "SDXL"
    return "SD2.x" if config.context_dim == 1024 else "SD1.5"
