"""Control-LoRA (Stability's control-lora files): a ControlNet made of the UNet's encoder plus low-rank deltas.

A Control-LoRA file holds the ControlNet's own layers (hint encoder, zero convolutions, middle block output)
in full, and for the layers it copies from the UNet either a full tensor (norms, biases, some weights) or a
low-rank pair `up` / `down`. As ComfyUI's `ControlLora` (comfy/controlnet.py), the ControlNet is built when a
run starts, from the UNet it is applied to (its weights as they are then: LoRAs fused before it in the stack
included): every tensor of the UNet's encoder, replaced by the file's full tensor where it has one, plus
`up.flatten(1) @ down.flatten(1)` (reshaped to the weight) where it has a pair.

ComfyUI adds the product to the weight at every layer call; here it is merged once per run (computed in
float32 and rounded to the compute dtype once), on the UNet's compute device, into a ControlNet that lives
for that run only: the same weights, no per-step work, one ControlNet's memory while sampling.

`ControlLora` holds the file's tensors (keyed by our `ControlNet`'s keys, see `loading.load_control_lora`);
`ControlLoraPatch` is the `ModelPatch` that builds the ControlNet for a run and applies it as
`ControlNetPatch` does (strength, start/end, mask, control mode).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .....fluxion import layers as fl
from .....fluxion.adapters.adapter import Adapter
from .....fluxion.casting import compute_placement
from .....fluxion.layers.chain import generate_unique_names
from ...model_config import unet_family
from ...model_patch import SamplingRun, Undo
from ...unet import UNet
from .model import (
    ControlMismatchError,
    ControlNet,
    ControlNetConfig,
    ControlNetPatch,
    check_control_settings,
    check_controlnet_fits,
)

if TYPE_CHECKING:
    from ...stable_diffusion import StableDiffusion


def _unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(module, Adapter):
        module = module.target
    return module


def _collect_base(module: nn.Module, prefix: str, found: dict[str, Tensor]) -> None:
    if isinstance(module, fl.Chain):
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is not None:
                found[prefix + name] = tensor
        for name, child in generate_unique_names(_unwrapped(child) for child in module).items():
            _collect_base(child, f"{prefix}{name}.", found)
    else:
        for name, tensor in module.state_dict(keep_vars=True).items():
            found[prefix + name] = tensor


def base_tensors(model: fl.Chain) -> dict[str, Tensor]:
    """`model`'s tensors under the keys its tree has without adapters: each injected adapter (an unfused LoRA,
    an IP-Adapter's attention, a ControlNet around the down blocks) is read as the layer it adapts, and the
    adapters' own layers are left out."""
    found: dict[str, Tensor] = {}
    _collect_base(model, "", found)
    return found


class ControlLora(nn.Module):
    """A Control-LoRA file's tensors on our `ControlNet`'s keys: full tensors, and (up, down) pairs per weight.

    `config` is the ControlNet the file describes (its UNet part read from the file's shapes); the ControlNet a
    run gets has the UNet's own config (`controlnet`).
    """

    def __init__(
        self,
        config: ControlNetConfig,
        full: Mapping[str, Tensor],
        pairs: Mapping[str, tuple[Tensor, Tensor]],
    ) -> None:
        super().__init__()
        self.config = config
        self.full_keys = list(full)
        self.pair_keys = list(pairs)
        self.full = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in full.values())
        self.up = nn.ParameterList(nn.Parameter(up, requires_grad=False) for up, _ in pairs.values())
        self.down = nn.ParameterList(nn.Parameter(down, requires_grad=False) for _, down in pairs.values())

    def tensors(self) -> tuple[dict[str, Tensor], dict[str, tuple[Tensor, Tensor]]]:
        """({our key: full tensor}, {our weight key: (up, down)})."""
        full = {key: tensor for key, tensor in zip(self.full_keys, self.full)}
        pairs = {key: (up, down) for key, up, down in zip(self.pair_keys, self.up, self.down)}
        return full, pairs

    def controlnet_config(self, unet: UNet) -> ControlNetConfig:
        """The ControlNet this Control-LoRA makes on `unet` (its config; hint encoder from the file)."""
        return ControlNetConfig(unet.config, self.config.conditioning_channels, self.config.hint_channels)

    def check_fits(self, unet: UNet) -> None:
        """Raise `ControlMismatchError` unless this Control-LoRA is for `unet`'s family and architecture."""
        check_controlnet_fits(self.config, unet.config, "this Control-LoRA")
        expected = ControlNet(self.controlnet_config(unet), device="meta").state_dict()
        for key in [*self.full_keys, *self.pair_keys]:
            if key not in expected:
                raise ControlMismatchError(
                    f"this Control-LoRA has a tensor for {key}, which the model's UNet "
                    f"({unet_family(unet.config)}) does not have"
                )

    def controlnet(self, unet: UNet) -> ControlNet:
        """The ControlNet on `unet`'s current weights, on its compute device and dtype (see the module doc)."""
        self.check_fits(unet)
        device, dtype = compute_placement(unet)
        controlnet = ControlNet(self.controlnet_config(unet), device="meta")
        base = base_tensors(unet)
        full, pairs = self.tensors()
        state: dict[str, Tensor] = {}
        with torch.no_grad():
            for key, expected in controlnet.state_dict().items():
                if (
                    key in full
                ):  # the file's tensor replaces the UNet's (ComfyUI sets the UNet's, then the file's)
                    tensor = full[key].detach()
                elif key in base:
                    tensor = base[key].detach()
                else:
                    raise ControlMismatchError(
                        f"this Control-LoRA has no {key} and the model's UNet none either"
                    )
                if key in pairs:
                    up, down = (part.to(device=device, dtype=torch.float32) for part in pairs[key])
                    delta = torch.mm(up.flatten(1), down.flatten(1)).reshape(tensor.shape)
                    tensor = (tensor.to(device=device, dtype=torch.float32) + delta).to(dtype)
                else:
                    tensor = tensor.to(device=device, dtype=dtype, copy=True)
                state[key] = tensor.reshape(expected.shape)
        controlnet.load_state_dict(state, strict=True, assign=True)
        return controlnet


class ControlLoraPatch:
    """A Control-LoRA for one sampling run: the ControlNet is built from the UNet when the run starts."""

    def __init__(
        self,
        control_lora: ControlLora,
        hint: Tensor,
        strength: float = 1.0,
        start: float = 0.0,
        end: float = 1.0,
        mask: Tensor | None = None,
        mode: str = "balanced",
        name: str = "Control-LoRA",
    ) -> None:
        check_control_settings(mode, start, end)
        self.control_lora, self.hint, self.strength = control_lora, hint, strength
        self.start, self.end, self.mask, self.mode, self.name = start, end, mask, mode, name

    @property
    def label(self) -> str:
        return f"{self.name} ({self.strength:g}, steps {self.start:g}-{self.end:g}, {self.mode})"

    def models(self) -> tuple[ControlLora]:
        """The file's tensors: brought to the run's device with the UNet (see `model_patch.patch_models`)."""
        return (self.control_lora,)

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        """Build the ControlNet from `model.unet` and inject it; the undo ejects it (the ControlNet goes)."""
        self.control_lora.check_fits(model.unet)
        if run is None:
            return lambda: None
        controlnet = self.control_lora.controlnet(model.unet)
        patch = ControlNetPatch(
            controlnet, self.hint, self.strength, self.start, self.end, self.mask, self.mode, self.name
        )
        return patch.apply(model, run)
