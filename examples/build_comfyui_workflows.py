"""Write the examples that mix ComfyUI's core nodes and ours: `python examples/build_comfyui_workflows.py`.

They live in examples/comfyui_workflows/ (not examples/workflows/) because they need ComfyUI itself: the
headless runner has no core loaders or KSampler, and core's loaders detect real architectures only (no tiny
demo checkpoint). The suite checks them without ComfyUI (tests/nodes/test_comfyui_examples.py: up to date,
our nodes' contract, every input given); tests/nodes/test_real_comfyui_core.py runs them in a real ComfyUI on
full-size random weights. `CORE_NODES` gives api_to_ui the inputs and widget order of the core nodes used,
as comfy's nodes.py declares them (ComfyUI 0.8.0).
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make the repository importable from anywhere
from nodes.runner import all_node_classes  # noqa: E402
from nodes.workflow_export import api_to_ui  # noqa: E402

SD15 = "v1-5-pruned-emaonly.safetensors"
LORA = "style.safetensors"
FOLDER = Path(__file__).resolve().parent / "comfyui_workflows"


def _core(name: str, required: dict, returns: tuple = (), names: tuple | None = None) -> type:
    attributes = {
        "INPUT_TYPES": classmethod(lambda cls: {"required": required}),
        "RETURN_TYPES": returns,
        "RETURN_NAMES": names or returns,
        "FUNCTION": "run",
    }
    return type(name, (), attributes)


_INT = {"default": 0}
CORE_NODES: dict[str, type] = {
    "CheckpointLoaderSimple": _core(
        "CheckpointLoaderSimple", {"ckpt_name": ([SD15],)}, ("MODEL", "CLIP", "VAE"), ("MODEL", "CLIP", "VAE")
    ),
    "CLIPTextEncode": _core(
        "CLIPTextEncode", {"text": ("STRING", {"multiline": True}), "clip": ("CLIP",)}, ("CONDITIONING",)
    ),
    "EmptyLatentImage": _core(
        "EmptyLatentImage",
        {"width": ("INT", _INT), "height": ("INT", _INT), "batch_size": ("INT", _INT)},
        ("LATENT",),
    ),
    "KSampler": _core(
        "KSampler",
        {
            "model": ("MODEL",),
            "seed": ("INT", {"default": 0, "control_after_generate": True}),
            "steps": ("INT", _INT),
            "cfg": ("FLOAT", {"default": 8.0}),
            "sampler_name": (["euler"],),
            "scheduler": (["normal"],),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "denoise": ("FLOAT", {"default": 1.0}),
        },
        ("LATENT",),
    ),
    "VAEDecode": _core("VAEDecode", {"samples": ("LATENT",), "vae": ("VAE",)}, ("IMAGE",)),
}


def core_checkpoint_fluxion_lora_ksampler() -> dict:
    """Core Load Checkpoint -> Fluxion Adopt -> Fluxion LoRA -> Fluxion To Core Model -> KSampler -> VAE Decode."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {
            "class_type": "FluxionAdoptCoreModel",
            "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]},
        },
        "3": {
            "class_type": "FluxionLoraLoader",
            "inputs": {
                "model": ["2", 0],
                "clip": ["2", 1],
                "lora_name": LORA,
                "strength_model": 0.8,
                "strength_clip": 0.0,  # the prompts are encoded by core CLIP Text Encode below
                "fuse": True,
            },
        },
        "4": {"class_type": "FluxionToCoreModel", "inputs": {"model": ["3", 0]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["1", 1]}},
        "7": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "8": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": 42,
                "steps": 20,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["5", 0],
                "negative": ["6", 0],
                "latent_image": ["7", 0],
                "denoise": 1.0,
            },
        },
        "9": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["1", 2]}},
        "10": {
            "class_type": "SaveImage",
            "inputs": {"images": ["9", 0], "filename_prefix": "fluxion_core_mix"},
        },
    }


WORKFLOWS = {"sd15_core_checkpoint_fluxion_lora_ksampler": core_checkpoint_fluxion_lora_ksampler}


def build() -> dict[Path, str]:
    """File path -> JSON text of every example, both formats."""
    classes = {**all_node_classes(), **CORE_NODES}
    files = {}
    for name, make in WORKFLOWS.items():
        prompt = make()
        files[FOLDER / f"{name}.api.json"] = json.dumps(prompt, indent=2) + "\n"
        files[FOLDER / f"{name}.json"] = json.dumps(api_to_ui(prompt, classes), indent=2) + "\n"
    return files


if __name__ == "__main__":
    FOLDER.mkdir(exist_ok=True)
    for path, text in build().items():
        path.write_text(text, encoding="utf-8")
        print(path)
