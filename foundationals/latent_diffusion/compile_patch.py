"""The opt-in `torch.compile` path (`unet.compile_unet`) as a `ModelPatch`: compiled for the runs that ask for it.

Applying the patch compiles the UNet's heavy blocks (ResNet blocks, spatial transformers: regional compilation,
see `fluxion.compile`); its undo puts them back on their eager call, so a branch without the patch runs eagerly.
The compiled callables are kept on the blocks and put back by the next run with the same options, so dynamo's
graphs (cached on the blocks' code and guarded on their structure) are reused instead of compiled again.

Never stale: dynamo guards on each block's children, so an adapter injected or ejected inside a compiled block
(a LoRA on a projection, an attention adapter) makes that block recompile at its next call, or run eagerly past
the recompile limit; weights are read at each call (LoRA fuse / unfuse is seen). Adapters wrapping a block keep
its compiled call inside them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ...fluxion.compile import is_compiled
from .model_patch import SamplingRun, Undo
from .unet import compile_unet

if TYPE_CHECKING:
    from .stable_diffusion import StableDiffusion

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
_KEPT = "_fluxion_compiled_calls"


def _options_key(options: dict[str, Any]) -> str:
    return repr(sorted(options.items()))


class CompilePatch:
    """A `ModelPatch`: the UNet's heavy blocks run `torch.compile`d for the run (eager again afterwards)."""

    def __init__(self, backend: str = "inductor", mode: str | None = None, dynamic: bool = False) -> None:
        if backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"compile: unknown backend {backend!r}; choose one of {', '.join(COMPILE_BACKENDS)}"
            )
        self.options: dict[str, Any] = {"backend": backend, "dynamic": dynamic}
        if mode and mode != "default":
            self.options["mode"] = mode

    @property
    def label(self) -> str:
        extra = f", mode {self.options['mode']}" if "mode" in self.options else ""
        return f"torch.compile (backend {self.options['backend']}{extra})"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        unet = model.unet
        if any(is_compiled(module) for module in unet.modules()):
            return lambda: None  # compiled by its owner (or an earlier patch of the stack): leave it so
        key = _options_key(self.options)
        kept: dict[str, list[tuple[torch.nn.Module, Any]]] = unet.__dict__.setdefault(_KEPT, {})
        calls = kept.get(key)
        present = {id(module) for module in unet.modules()}
        if calls is not None and all(id(module) in present for module, _ in calls):
            for module, call in calls:
                module._compiled_call_impl = call
            compiled = [module for module, _ in calls]
        else:
            compiled = compile_unet(unet, **dict(self.options))
            kept[key] = [(module, module._compiled_call_impl) for module in compiled]

        def undo() -> None:
            for module in compiled:
                module._compiled_call_impl = None

        return undo
