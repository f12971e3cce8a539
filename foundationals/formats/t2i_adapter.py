"""The T2I-Adapter file layouts (TencentARC `conv_in`/`body.N.*`, diffusers `adapter.*`): key maps onto our `T2IAdapter`."""

from __future__ import annotations

from ...fluxion import layers as fl
from .ldm import is_block

T2I_EXPECTED = (
    "a T2I-Adapter (TencentARC keys conv_in.*, body.N.block1/block2 or body.N.in_conv/body.N.body.M.*, "
    "or diffusers keys adapter.conv_in.*, adapter.body.N.resnets.M.*)"
)


def t2i_adapter_key_map(adapter: fl.Chain, layout: str) -> dict[str, str]:
    """`{their key: our key}` for "tencentarc" or "diffusers" layout files."""
    config = adapter.config
    names = [
        name
        for name, child in adapter.named_children()
        if is_block(child, "AdapterBlock", "LightAdapterBlock")
    ]
    module_map: dict[str, str] = {}
    if config.kind != "light":
        module_map["Conv2d"] = "adapter.conv_in" if layout == "diffusers" else "conv_in"
    for level, name in enumerate(names):
        block: fl.Chain = adapter[name]  # type: ignore[assignment]
        residuals = [n for n, c in block.named_children() if is_block(c, "AdapterResidualBlock")]
        convs = [n for n, c in block.named_children() if isinstance(c, fl.Conv2d)]
        for position, residual in enumerate(residuals):
            if layout == "diffusers":
                theirs = f"adapter.body.{level}.resnets.{position}"
            elif config.kind == "light":
                theirs = f"body.{level}.body.{position}"
            else:
                theirs = f"body.{level * config.num_res_blocks + position}"
            module_map[f"{name}.{residual}.Conv2d_1"] = f"{theirs}.block1"
            module_map[f"{name}.{residual}.Conv2d_2"] = f"{theirs}.block2"
        if config.kind == "light":
            prefix = "adapter.body" if layout == "diffusers" else "body"
            module_map[f"{name}.{convs[0]}"] = f"{prefix}.{level}.in_conv"
            module_map[f"{name}.{convs[1]}"] = f"{prefix}.{level}.out_conv"
        elif convs:
            theirs = (
                f"adapter.body.{level}" if layout == "diffusers" else f"body.{level * config.num_res_blocks}"
            )
            module_map[f"{name}.{convs[0]}"] = f"{theirs}.in_conv"
    keys: dict[str, str] = {}
    for ours in adapter.state_dict():
        module, _, tensor = ours.rpartition(".")
        keys[f"{module_map[module]}.{tensor}"] = ours
    return keys
