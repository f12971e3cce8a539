"""T2I-Adapter: the model and its adapter (`model`), and reading its files (`loading`)."""

from .loading import infer_t2i_config, load_t2i_adapter
from .model import T2IAdapter, T2IAdapterConfig, T2IAdapterPatch, check_adapter_fits

__all__ = [
    "T2IAdapter",
    "T2IAdapterConfig",
    "T2IAdapterPatch",
    "check_adapter_fits",
    "infer_t2i_config",
    "load_t2i_adapter",
]
