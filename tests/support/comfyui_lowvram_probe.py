"""Run in ComfyUI's own python (see tests/nodes/test_real_comfyui_lowvram.py): the pack's UNet under ComfyUI's
real ModelPatcher when it cannot fit a model whole; prints JSON.

    python tests/support/comfyui_lowvram_probe.py /path/to/ComfyUI [--fp8_e4m3fn-unet]

The pack is imported as ComfyUI imports a custom node (a package from the repository's folder), so
`nodes.host` is hosted. A tiny UNet is managed as the pack manages its UNet and run on fixed inputs:

- fully loaded (what `--cpu` always does), the reference output;
- loaded by `ModelPatcher.load` with a budget of a third of its size (what `--lowvram` / a short GPU does):
  ComfyUI flags the layers it leaves on the offload device, the pack streams them;
- partially unloaded by `ModelPatcher.partially_unload` (what ComfyUI does to make room for another model);
- with a core weight patch (`add_patches`, as core's LoRA loader adds) on a streamed layer: ComfyUI hands it
  to the layer as a `weight_function`, compared with the same patch applied in place by a full load;
- loaded whole again through the pack's `host.load_models`: the flags are gone.

With `--fp8_e4m3fn-unet` it reports the placement ComfyUI's flags give the pack's UNet, and a UNet stored in
fp8 and computed in that placement's compute dtype against float32 weights rounded through fp8.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
COMFYUI = Path(sys.argv[1]).resolve()
FLAGS = sys.argv[2:]
sys.path[:0] = [str(COMFYUI)]

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
sys.argv = [sys.argv[0], "--cpu", *FLAGS]  # ComfyUI's device setup reads its command line on import

import torch  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "fluxion_pack", REPOSITORY / "__init__.py", submodule_search_locations=[str(REPOSITORY)]
)
assert spec is not None and spec.loader is not None
pack = importlib.util.module_from_spec(spec)
sys.modules["fluxion_pack"] = pack
spec.loader.exec_module(pack)

from fluxion_pack.fluxion.casting import compute_placement  # noqa: E402
from fluxion_pack.foundationals.clip.config import text_preset  # noqa: E402
from fluxion_pack.foundationals.clip.text_encoder import CLIPTextEncoder  # noqa: E402
from fluxion_pack.foundationals.latent_diffusion.model_config import TINY_UNET  # noqa: E402
from fluxion_pack.foundationals.latent_diffusion.unet import UNet  # noqa: E402
from fluxion_pack.nodes import host  # noqa: E402

CPU = torch.device("cpu")


def tiny_unet(dtype: torch.dtype = torch.float32) -> UNet:
    torch.manual_seed(0)
    unet = UNet(TINY_UNET)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.05)
    return unet.to(dtype=dtype)


def run(unet: UNet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 7, TINY_UNET.context_dim, generator=generator)
    device, dtype = compute_placement(unet)
    with torch.no_grad():
        unet.set_timestep(torch.tensor([500.0, 500.0], device=device))
        unet.set_clip_text_embedding(context.to(device=device, dtype=dtype))
        return unet(x.to(device=device, dtype=dtype)).float()


def streamed(unet: UNet) -> int:
    return sum(1 for layer in unet.modules() if getattr(layer, "comfy_cast_weights", False))


def lowvram_report() -> dict[str, object]:
    unet = tiny_unet()
    managed = host.manage(unet, "unet", name="tiny UNet")
    host.load_models([unet])
    full = run(unet)
    patcher = managed.patcher
    layers = sum(1 for layer in unet.modules() if hasattr(layer, "comfy_cast_weights"))
    report: dict[str, object] = {"layers": layers, "hosted": host.is_hosted()}

    patcher.detach()
    patcher.load(CPU, lowvram_model_memory=managed.size // 3)  # what a short GPU makes ComfyUI do
    report["lowvram"] = {
        "streamed": streamed(unet),
        "model_lowvram": bool(patcher.model.model_lowvram),
        "equal": bool(torch.equal(run(unet), full)),
    }

    patcher.detach()
    patcher.load(CPU, full_load=True)
    freed = patcher.partially_unload(CPU, memory_to_free=managed.size // 2)
    report["partially_unloaded"] = {
        "freed": int(freed),
        "streamed": streamed(unet),
        "equal": bool(torch.equal(run(unet), full)),
    }

    patcher.detach()
    patcher.load(CPU, lowvram_model_memory=managed.size // 3)
    key = next(  # a convolution the budget leaves streamed
        f"{name}.weight"
        for name, layer in patcher.model.named_modules()
        if getattr(layer, "comfy_cast_weights", False) and isinstance(layer, torch.nn.Conv2d)
    )
    weight = patcher.model.get_parameter(key)
    diff = torch.randn(weight.shape, generator=torch.Generator().manual_seed(2)) * 0.05
    patcher.detach()
    patcher.add_patches({key: (diff,)}, 1.0)
    patcher.load(CPU, full_load=True)  # the patch applied in place (core's full load)
    in_place = run(unet)
    patcher.detach()
    patcher.load(CPU, lowvram_model_memory=managed.size // 3)
    layer = patcher.model.get_submodule(key.rsplit(".", 1)[0])
    report["weight_function"] = {
        "key": key,
        "layer_streamed": bool(getattr(layer, "comfy_cast_weights", False)),
        "functions": len(getattr(layer, "weight_function", [])),
        "changed": bool(not torch.equal(in_place, full)),
        "max_abs": float((run(unet) - in_place).abs().max()),
    }
    patcher.detach()
    patcher.patches.clear()

    host.load_models([unet])  # the pack's own path: --cpu loads whole, the flags go
    report["reloaded"] = {"streamed": streamed(unet), "equal": bool(torch.equal(run(unet), full))}
    report["listed"] = host.loaded_model_names()
    return report


def text_encoder_report() -> dict[str, object]:
    """The CLIP text encoder (embeddings, attention, MLPs) under the same partial load."""
    torch.manual_seed(0)
    encoder = CLIPTextEncoder(text_preset("tiny"))
    managed = host.manage(encoder, "text_encoder", name="tiny text encoder")
    host.load_models([encoder])
    tokens = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = encoder(tokens).float()
        managed.patcher.detach()
        managed.patcher.load(CPU, lowvram_model_memory=managed.size // 3)
        partial = encoder(tokens).float()
    return {"streamed": streamed(encoder), "equal": bool(torch.equal(partial, full))}


def fp8_report() -> dict[str, object]:
    placement = host.model_placement("unet")
    report: dict[str, object] = {"dtype": str(placement.dtype), "compute_dtype": str(placement.compute_dtype)}
    if placement.compute_dtype is None:
        return report
    unet = tiny_unet().to(dtype=placement.dtype)
    host.manage(unet, "unet", name="fp8 UNet")
    host.load_models([unet])
    rounded = tiny_unet().to(dtype=placement.dtype).to(dtype=placement.compute_dtype)
    output, expected = run(unet), run(rounded)
    report["stored"] = sorted({str(p.dtype) for p in unet.parameters()})
    report["max_abs"] = float((output - expected).abs().max())
    report["scale"] = float(expected.abs().max())
    return report


if __name__ == "__main__":
    print(
        json.dumps({"lowvram": lowvram_report(), "text_encoder": text_encoder_report(), "fp8": fp8_report()})
    )
