"""IP-Adapter (base, plus, FaceID, FaceID Plus v1/v2): image projections (`model`), the decoupled cross-attention and its patch (`adapter`), saved image
embeddings (`embeddings`), and reading its files (`loading`)."""

from .adapter import (
    COMBINE_MODES,
    ImageAttention,
    ImageCrossAttention,
    IPAdapter,
    IPAdapterInjection,
    IPAdapterPatch,
    iter_ip_adapters,
)
from .block_weights import WEIGHT_TYPES, BlockWeights, block_weights, spatial_transformers
from .embeddings import IMAGE_EMBEDS, PENULTIMATE, FaceEmbeddings, ImageEmbeddings
from .loading import ip_adapter_from_state_dict, load_ip_adapter
from .model import FaceIDPlusProjection, FaceIDProjection, ImageProjection, PerceiverResampler

__all__ = [
    "COMBINE_MODES",
    "WEIGHT_TYPES",
    "BlockWeights",
    "block_weights",
    "spatial_transformers",
    "IMAGE_EMBEDS",
    "PENULTIMATE",
    "FaceEmbeddings",
    "FaceIDPlusProjection",
    "FaceIDProjection",
    "IPAdapter",
    "IPAdapterInjection",
    "IPAdapterPatch",
    "ImageAttention",
    "ImageCrossAttention",
    "ImageEmbeddings",
    "ImageProjection",
    "PerceiverResampler",
    "ip_adapter_from_state_dict",
    "iter_ip_adapters",
    "load_ip_adapter",
]
