"""Shapes of the CLIP text and image encoders Stable Diffusion uses, as data: one config, named presets."""

from __future__ import annotations

from dataclasses import dataclass, replace

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclass(frozen=True)
class CLIPTextConfig:
    """A CLIP text transformer: widths, depth, heads, activation and an optional text projection."""

    embedding_dim: int = 768
    num_layers: int = 12
    num_heads: int = 12
    feedforward_dim: int = 3072
    vocabulary_size: int = 49408
    max_sequence_length: int = 77
    activation: str = "quick_gelu"
    projection_dim: int | None = None
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.embedding_dim % self.num_heads != 0:
            raise ValueError(f"embedding_dim {self.embedding_dim} is not divisible by {self.num_heads} heads")

    def with_projection(self, projection_dim: int | None) -> CLIPTextConfig:
        """The same transformer with (or without) a text projection of that width."""
        return replace(self, projection_dim=projection_dim)


@dataclass(frozen=True)
class CLIPImageConfig:
    """A CLIP ViT image tower: patch size, widths, depth, heads, activation and the image projection."""

    embedding_dim: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    feedforward_dim: int = 5120
    image_size: int = 224
    patch_size: int = 14
    projection_dim: int = 1024
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.embedding_dim % self.num_heads != 0:
            raise ValueError(f"embedding_dim {self.embedding_dim} is not divisible by {self.num_heads} heads")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )

    @property
    def num_patches(self) -> int:
        """Patches per image (the sequence is these plus the class token)."""
        return (self.image_size // self.patch_size) ** 2


TEXT_PRESETS: dict[str, CLIPTextConfig] = {
    # OpenAI CLIP ViT-L/14 text tower: SD1.5's encoder and SDXL's first one (no projection in SD files).
    "clip_l": CLIPTextConfig(),
    # OpenCLIP ViT-H/14 text tower (SD2.x).
    "openclip_h": CLIPTextConfig(
        embedding_dim=1024, num_layers=24, num_heads=16, feedforward_dim=4096, activation="gelu"
    ),
    # OpenCLIP ViT-bigG/14 text tower: SDXL's second encoder, with its pooled text projection.
    "openclip_bigg": CLIPTextConfig(
        embedding_dim=1280,
        num_layers=32,
        num_heads=20,
        feedforward_dim=5120,
        activation="gelu",
        projection_dim=1280,
    ),
    # For tests: real vocabulary and sequence length (works with the real tokenizer), tiny transformer.
    "tiny": CLIPTextConfig(embedding_dim=32, num_layers=3, num_heads=4, feedforward_dim=37),
    # Tiny second SDXL encoder (bigG-like: gelu, projection): with "tiny", a 48-wide SDXL context.
    "tiny_bigg": CLIPTextConfig(
        embedding_dim=16, num_layers=3, num_heads=2, feedforward_dim=24, activation="gelu", projection_dim=40
    ),
}

IMAGE_PRESETS: dict[str, CLIPImageConfig] = {
    # OpenAI CLIP ViT-L/14 image tower.
    "vit_l": CLIPImageConfig(
        embedding_dim=1024,
        num_layers=24,
        num_heads=16,
        feedforward_dim=4096,
        projection_dim=768,
        activation="quick_gelu",
    ),
    # OpenCLIP ViT-H/14 image tower: IP-Adapter (SD1.5, and SDXL "vit-h" variants).
    "vit_h": CLIPImageConfig(),
    # OpenCLIP ViT-bigG/14 image tower: IP-Adapter SDXL.
    "vit_bigg": CLIPImageConfig(
        embedding_dim=1664, num_layers=48, num_heads=16, feedforward_dim=8192, projection_dim=1280
    ),
    # For tests: a 32x32 image in 8x8 patches.
    "tiny": CLIPImageConfig(
        embedding_dim=32,
        num_layers=3,
        num_heads=4,
        feedforward_dim=37,
        image_size=32,
        patch_size=8,
        projection_dim=24,
    ),
}


def text_preset(name: str) -> CLIPTextConfig:
    """The named text-encoder preset (see `TEXT_PRESETS`)."""
    if name not in TEXT_PRESETS:
        raise ValueError(f"unknown CLIP text preset {name!r}; known: {', '.join(TEXT_PRESETS)}")
    return TEXT_PRESETS[name]


def image_preset(name: str) -> CLIPImageConfig:
    """The named image-encoder preset (see `IMAGE_PRESETS`)."""
    if name not in IMAGE_PRESETS:
        raise ValueError(f"unknown CLIP image preset {name!r}; known: {', '.join(IMAGE_PRESETS)}")
    return IMAGE_PRESETS[name]
