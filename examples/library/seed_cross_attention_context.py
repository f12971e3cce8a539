"""The seed's second snippet: cross-attention fed through the Context API (`UseContext` + `set_context`)."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # make the repository importable from anywhere
import fluxion.layers as fl  # noqa: E402


class ViT(fl.Chain):
    def __init__(
        self,
        embedding_dim: int = 512,
        patch_size: int = 16,
        image_size: int = 384,
        num_layers: int = 12,
        num_heads: int = 8,
    ):
        num_patches = image_size // patch_size
        super().__init__(
            fl.Conv2d(in_channels=3, out_channels=embedding_dim, kernel_size=patch_size, stride=patch_size),
            fl.Reshape(num_patches**2, embedding_dim),
            fl.Residual(fl.Parameter(num_patches**2, embedding_dim)),
            *(
                fl.Chain(
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Parallel(
                            fl.Identity(),
                            fl.UseContext(context="cross_attention", key="my_embed"),
                            fl.UseContext(context="cross_attention", key="my_embed"),
                        ),  # used to pass multiple inputs to a layer
                        fl.Attention(
                            embedding_dim=embedding_dim,
                            num_heads=num_heads,
                            key_embedding_dim=embedding_dim,
                            value_embedding_dim=embedding_dim,
                        ),
                    ),
                    fl.LayerNorm(embedding_dim),
                    fl.Residual(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                    fl.Chain(
                        fl.Linear(embedding_dim, embedding_dim * 4),
                        fl.GeLU(),
                        fl.Linear(embedding_dim * 4, embedding_dim),
                    ),
                )
                for _ in range(num_layers)
            ),
            fl.Reshape(embedding_dim, num_patches, num_patches),
        )


if __name__ == "__main__":
    vit = ViT(embedding_dim=768, image_size=224, num_heads=12)  # ~ViT-B/16 like
    vit.set_context("cross_attention", {"my_embed": torch.randn(2, 196, 768)})
    x = torch.randn(2, 3, 224, 224)
    y = vit(x)
    print("output:", tuple(y.shape))
