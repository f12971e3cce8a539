"""fluxion: a declarative micro-framework on PyTorch (Chain, Context API, Adapter API, LoRA)."""

if "." not in __name__:  # imported from the repository root: become the pack's module (see _toplevel)
    from fluxion._toplevel import alias_to_pack

    alias_to_pack(__name__)
else:
    from . import adapters, layers
    from .utils import load_from_safetensors, manual_seed, no_grad, save_to_safetensors

    __all__ = ["adapters", "layers", "load_from_safetensors", "manual_seed", "no_grad", "save_to_safetensors"]
