"""Write the example workflows, API format and its editor (UI) twin: `python examples/build_workflows.py`.

The prompts below are the source of truth; the JSON files in examples/workflows/ are generated from them
(a test checks they are up to date). File names of models match common real ones, so the workflows run
as they are on a ComfyUI that has them, and on the tiny models `python -m nodes demo` writes.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make the repository importable from anywhere
from nodes.runner import all_node_classes  # noqa: E402
from nodes.workflow_export import api_to_ui  # noqa: E402

SD15 = "v1-5-pruned-emaonly.safetensors"
FOLDER = Path(__file__).resolve().parent / "workflows"


def text_encode(clip: list, text: str) -> dict:
    return {"class_type": "FluxionCLIPTextEncode", "inputs": {"clip": clip, "text": text, "clip_skip": 1}}


def sd15_base(positive: str, negative: str = "blurry, low quality") -> dict:
    return {
        "1": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": SD15}},
        "2": text_encode(["1", 1], positive),
        "3": text_encode(["1", 1], negative),
    }


def sampler(
    model: list,
    latent: list,
    seed: int = 42,
    steps: int = 8,
    denoise: float = 1.0,
    positive: list | None = None,
    negative: list | None = None,
) -> dict:
    return {
        "class_type": "FluxionSampler",
        "inputs": {
            "model": model,
            "positive": positive or ["2", 0],
            "negative": negative or ["3", 0],
            "latent_image": latent,
            "seed": seed,
            "steps": steps,
            "cfg": 7.0,
            "solver": "dpmpp_2m",
            "schedule": "karras",
            "denoise": denoise,
        },
    }


def decode_and_save(samples: list, prefix: str, first_id: int) -> dict:
    return {
        str(first_id): {
            "class_type": "FluxionVAEDecode",
            "inputs": {"vae": ["1", 2], "samples": samples, "tiled": False},
        },
        str(first_id + 1): {
            "class_type": "SaveImage",
            "inputs": {"images": [str(first_id), 0], "filename_prefix": prefix},
        },
    }


def txt2img() -> dict:
    return {
        **sd15_base("a lighthouse on a cliff at sunset, oil painting, (dramatic sky:1.2)"),
        "4": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "5": sampler(["1", 0], ["4", 0]),
        **decode_and_save(["5", 0], "fluxion_txt2img", 6),
    }


def img2img() -> dict:
    return {
        **sd15_base("a watercolor painting of a landscape"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "FluxionVAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["4", 0]}},
        "6": sampler(["1", 0], ["5", 0], denoise=0.6),
        **decode_and_save(["6", 0], "fluxion_img2img", 7),
    }


def inpaint() -> dict:
    return {
        **sd15_base("a round window"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example_inpaint.png"}},
        "5": {
            "class_type": "FluxionVAEEncode",
            "inputs": {"vae": ["1", 2], "pixels": ["4", 0], "mask": ["4", 1]},
        },
        "6": sampler(["1", 0], ["5", 0]),
        **decode_and_save(["6", 0], "fluxion_inpaint", 7),
    }


def lora() -> dict:
    prompt = sd15_base("a castle in the clouds, fluxion style")
    prompt["2"]["inputs"]["clip"] = ["4", 1]
    prompt["3"]["inputs"]["clip"] = ["4", 1]
    return {
        **prompt,
        "4": {
            "class_type": "FluxionLoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "fluxion_demo_lora.safetensors",
                "strength_model": 0.8,
                "strength_clip": 1.0,
                "fuse": True,
            },
        },
        "5": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": sampler(["4", 0], ["5", 0]),
        **decode_and_save(["6", 0], "fluxion_lora", 7),
    }


def lora_stack() -> dict:
    prompt = sd15_base("a castle in the clouds, fluxion style, detailed stonework")
    prompt["2"]["inputs"]["clip"] = ["4", 1]
    prompt["3"]["inputs"]["clip"] = ["4", 1]
    loras = [
        ("fluxion_demo_lora.safetensors", 0.8, 1.0),
        ("fluxion_demo_lora_2.safetensors", 0.5, 0.5),
        ("fluxion_demo_locon.safetensors", 0.6, 0.0),
        ("None", 1.0, 1.0),
    ]
    stack: dict = {"model": ["1", 0], "clip": ["1", 1]}
    for slot, (name, unet, clip) in enumerate(loras, start=1):
        stack.update({f"lora_{slot}": name, f"strength_model_{slot}": unet, f"strength_clip_{slot}": clip})
    stack["fuse"] = True
    return {
        **prompt,
        "4": {"class_type": "FluxionLoraStack", "inputs": stack},
        "5": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": sampler(["4", 0], ["5", 0]),
        **decode_and_save(["6", 0], "fluxion_lora_stack", 7),
    }


def regional_lora() -> dict:
    return {
        **sd15_base("two houses by a lake, the left one in fluxion style"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example_mask.png"}},
        "5": {
            "class_type": "FluxionRegionalLora",
            "inputs": {
                "model": ["1", 0],
                "lora_name": "fluxion_demo_lora.safetensors",
                "strength_model": 1.0,
                "start": 0.0,
                "end": 0.8,
                "outside_mask": "blend",
                "mask": ["4", 1],
            },
        },
        "6": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "7": sampler(["5", 0], ["6", 0]),
        **decode_and_save(["7", 0], "fluxion_regional_lora", 8),
    }


def controlnet_canny() -> dict:
    return {
        **sd15_base("a glass house in a forest, photograph"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionCanny",
            "inputs": {"image": ["4", 0], "low_threshold": 0.2, "high_threshold": 0.6},
        },
        "6": {
            "class_type": "FluxionControlLoader",
            "inputs": {"control_name": "control_v11p_sd15_canny.safetensors"},
        },
        "7": {
            "class_type": "FluxionApplyControl",
            "inputs": {
                "model": ["1", 0],
                "control": ["6", 0],
                "image": ["5", 0],
                "strength": 0.9,
                "start_percent": 0.0,
                "end_percent": 0.8,
                "mode": "balanced",
            },
        },
        "8": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "9": sampler(["7", 0], ["8", 0]),
        **decode_and_save(["9", 0], "fluxion_controlnet", 10),
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


def ip_adapter() -> dict:
    return {
        **sd15_base("a portrait in the style of the reference, best quality"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter_sd15.safetensors"},
        },
        "6": {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"},
        },
        "7": {
            "class_type": "FluxionApplyIPAdapter",
            "inputs": {
                "model": ["1", 0],
                "ipadapter": ["5", 0],
                "clip_vision": ["6", 0],
                "image": ["4", 0],
                "weight": 0.8,
                "combine": "concat",
                "image_weights": "",
                "start_percent": 0.0,
                "end_percent": 1.0,
                "outside_mask": "blend",
                "weight_type": "linear",
                "weight_composition": 1.0,
                "layer_weights": "",
            },
        },
        "8": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "9": sampler(["7", 0], ["8", 0]),
        **decode_and_save(["9", 0], "fluxion_ip_adapter", 10),
    }


def apply_ip_adapter(model: list, ipadapter: list, weight: float = 0.8, **inputs: object) -> dict:
    return {
        "class_type": "FluxionApplyIPAdapter",
        "inputs": {
            "model": model,
            "ipadapter": ipadapter,
            **inputs,
            "weight": weight,
            "combine": "concat",
            "image_weights": "",
            "start_percent": 0.0,
            "end_percent": 1.0,
            "outside_mask": "blend",
            "weight_type": "linear",
            "weight_composition": 1.0,
            "layer_weights": "",
        },
    }


def ip_adapter_plus_two_images_mask() -> dict:
    """Two reference images (one batch) with their own weights, acting only inside a mask (the transparent part
    of example_mask.png: LoadImage's MASK is 1 - alpha)."""
    apply = apply_ip_adapter(["1", 0], ["8", 0], clip_vision=["9", 0], image=["6", 0], mask=["7", 1])
    apply["inputs"]["image_weights"] = "1, 0.6"
    return {
        **sd15_base("a portrait mixing both references, best quality"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "LoadImage", "inputs": {"image": "example_2.png"}},
        "6": {"class_type": "ImageBatch", "inputs": {"image1": ["4", 0], "image2": ["5", 0]}},
        "7": {"class_type": "LoadImage", "inputs": {"image": "example_mask.png"}},
        "8": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter-plus_sd15.safetensors"},
        },
        "9": {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"},
        },
        "10": apply,
        "11": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "12": sampler(["10", 0], ["11", 0]),
        **decode_and_save(["12", 0], "fluxion_ip_adapter_plus_mask", 13),
    }


def ip_adapter_controlnet() -> dict:
    return {
        **sd15_base("a glass house in the style of the reference, photograph"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionCanny",
            "inputs": {"image": ["4", 0], "low_threshold": 0.2, "high_threshold": 0.6},
        },
        "6": {
            "class_type": "FluxionControlLoader",
            "inputs": {"control_name": "control_v11p_sd15_canny.safetensors"},
        },
        "7": {
            "class_type": "FluxionApplyControl",
            "inputs": {
                "model": ["1", 0],
                "control": ["6", 0],
                "image": ["5", 0],
                "strength": 0.9,
                "start_percent": 0.0,
                "end_percent": 0.8,
                "mode": "balanced",
            },
        },
        "8": {"class_type": "LoadImage", "inputs": {"image": "example_2.png"}},
        "9": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter_sd15.safetensors"},
        },
        "10": {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"},
        },
        "11": apply_ip_adapter(["7", 0], ["9", 0], 0.7, clip_vision=["10", 0], image=["8", 0]),
        "12": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "13": sampler(["11", 0], ["12", 0]),
        **decode_and_save(["13", 0], "fluxion_ip_adapter_controlnet", 14),
    }


def ip_adapter_embeds() -> dict:
    """Encode a reference once and save its embeds; prompt with embeds loaded from the input folder."""
    return {
        **sd15_base("a portrait in the style of the saved reference"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter_sd15.safetensors"},
        },
        "6": {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"},
        },
        "7": {
            "class_type": "FluxionEncodeIPAdapterEmbeds",
            "inputs": {"ipadapter": ["5", 0], "clip_vision": ["6", 0], "image": ["4", 0]},
        },
        "8": {
            "class_type": "FluxionSaveIPAdapterEmbeds",
            "inputs": {"embeds": ["7", 0], "filename_prefix": "fluxion_ipadapter_embeds"},
        },
        "9": {
            "class_type": "FluxionLoadIPAdapterEmbeds",
            "inputs": {"embeds_name": "example_ipadapter_embeds.safetensors"},
        },
        "10": apply_ip_adapter(["1", 0], ["5", 0], embeds=["9", 0]),
        "11": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "12": sampler(["10", 0], ["11", 0]),
        **decode_and_save(["12", 0], "fluxion_ip_adapter_embeds", 13),
    }


def reference_only() -> dict:
    return {
        **sd15_base("a landscape in the same style"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionReferenceOnly",
            "inputs": {
                "model": ["1", 0],
                "vae": ["1", 2],
                "image": ["4", 0],
                "strength": 1.0,
                "style_fidelity": 0.5,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "mode": "attn",
                "adain_strength": 1.0,
            },
        },
        "6": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "7": sampler(["5", 0], ["6", 0]),
        **decode_and_save(["7", 0], "fluxion_reference_only", 8),
    }


def inspect_and_context() -> dict:
    return {
        **sd15_base("a quiet harbour at dawn"),
        "4": {
            "class_type": "FluxionSetContext",
            "inputs": {
                "model": ["1", 0],
                "context": "fluxion_demo",
                "key": "note",
                "value": '"any JSON value"',
            },
        },
        "5": {"class_type": "FluxionInspectModel", "inputs": {"model": ["4", 0]}},
        "6": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 2}},
        "7": sampler(["4", 0], ["6", 0], steps=4),
        **decode_and_save(["7", 0], "fluxion_context", 8),
    }


def v_prediction() -> dict:
    """A v-prediction, zero-terminal-SNR fine-tune whose file lacks the v_pred / ztsnr keys: say it per model."""
    sampling = sampler(["4", 0], ["5", 0], steps=8)
    sampling["inputs"].update(solver="uni_pc_bh2", schedule="trailing")
    return {
        **sd15_base("a snowy mountain village at night, warm window lights"),
        "4": {
            "class_type": "FluxionModelSamplingDiscrete",
            "inputs": {"model": ["1", 0], "sampling": "v_prediction", "zsnr": True},
        },
        "5": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": sampling,
        **decode_and_save(["6", 0], "fluxion_v_prediction", 7),
    }


def guidance() -> dict:
    """Every SD1.5 guidance stacked on a LoRA: FreeU V2, PAG, SAG, rescaled CFG and a CFG cutoff."""
    prompt = sd15_base("a cozy cabin in a snowy forest, warm light, detailed")
    prompt["2"]["inputs"]["clip"] = ["4", 1]
    prompt["3"]["inputs"]["clip"] = ["4", 1]
    return {
        **prompt,
        "4": {
            "class_type": "FluxionLoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "fluxion_demo_lora.safetensors",
                "strength_model": 0.6,
                "strength_clip": 1.0,
                "fuse": False,
            },
        },
        "5": {
            "class_type": "FluxionFreeUV2",
            "inputs": {"model": ["4", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2, "blocks": "channels"},
        },
        "6": {
            "class_type": "FluxionPerturbedAttentionGuidance",
            "inputs": {"model": ["5", 0], "scale": 3.0, "layers": "mid", "adaptive_scale": 0.0},
        },
        "7": {
            "class_type": "FluxionSelfAttentionGuidance",
            "inputs": {"model": ["6", 0], "scale": 0.5, "blur_sigma": 2.0},
        },
        "8": {
            "class_type": "FluxionRescaleCFG",
            "inputs": {"model": ["7", 0], "multiplier": 0.7, "space": "v"},
        },
        "9": {"class_type": "FluxionCFGCutoff", "inputs": {"model": ["8", 0], "cutoff": 0.6}},
        "10": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "11": sampler(["9", 0], ["10", 0]),
        **decode_and_save(["11", 0], "fluxion_guidance", 12),
    }


def regional_prompt() -> dict:
    """Core conditioning nodes into the Fluxion sampler: a prompt per half of the picture (Conditioning Set Area),
    combined with the whole picture's prompt (Conditioning Combine), from core's Empty Latent Image."""
    return {
        **sd15_base("a quiet valley at dawn, mist, wide landscape"),
        "4": text_encode(["1", 1], "a red wooden barn"),
        "5": {
            "class_type": "ConditioningSetArea",
            "inputs": {
                "conditioning": ["4", 0],
                "width": 256,
                "height": 512,
                "x": 0,
                "y": 0,
                "strength": 1.0,
            },
        },
        "6": text_encode(["1", 1], "a tall pine tree"),
        "7": {
            "class_type": "ConditioningSetArea",
            "inputs": {
                "conditioning": ["6", 0],
                "width": 256,
                "height": 512,
                "x": 256,
                "y": 0,
                "strength": 0.8,
            },
        },
        "8": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["5", 0], "conditioning_2": ["7", 0]},
        },
        "9": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["8", 0]},
        },
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "11": sampler(["1", 0], ["10", 0], positive=["9", 0]),
        **decode_and_save(["11", 0], "fluxion_regional_prompt", 12),
    }


def masked_prompt_upscale() -> dict:
    """A prompt weighted by a mask (Conditioning Set Mask, the transparent part of a Load Image), a style prompt
    for the last steps only (ConditioningSetTimestepRange), then core's Upscale Latent and a second pass."""
    return {
        **sd15_base("a garden with a stone fountain"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example_mask.png"}},
        "5": text_encode(["1", 1], "a bed of red roses"),
        "6": {
            "class_type": "ConditioningSetMask",
            "inputs": {
                "conditioning": ["5", 0],
                "mask": ["4", 1],
                "strength": 1.0,
                "set_cond_area": "default",
            },
        },
        "7": text_encode(["1", 1], "watercolor, soft light"),
        "8": {
            "class_type": "ConditioningSetTimestepRange",
            "inputs": {"conditioning": ["7", 0], "start": 0.6, "end": 1.0},
        },
        "9": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["6", 0]},
        },
        "10": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["9", 0], "conditioning_2": ["8", 0]},
        },
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "12": sampler(["1", 0], ["11", 0], positive=["10", 0]),
        "13": {
            "class_type": "LatentUpscale",
            "inputs": {
                "samples": ["12", 0],
                "upscale_method": "bilinear",
                "width": 768,
                "height": 768,
                "crop": "disabled",
            },
        },
        "14": sampler(["1", 0], ["13", 0], seed=43, steps=8, denoise=0.5, positive=["10", 0]),
        **decode_and_save(["14", 0], "fluxion_masked_prompt_upscale", 15),
    }


def inpaint_core_mask() -> dict:
    """Fluxion VAE Encode without a mask, then core's Set Latent Noise Mask: the sampler repaints the mask."""
    return {
        **sd15_base("a round window"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example_inpaint.png"}},
        "5": {"class_type": "FluxionVAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["4", 0]}},
        "6": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["4", 1]}},
        "7": sampler(["1", 0], ["6", 0]),
        **decode_and_save(["7", 0], "fluxion_inpaint_core_mask", 8),
    }


def core_clip_and_vae() -> dict:
    """Inside ComfyUI: core's Load Checkpoint gives CLIP Text Encode and VAE Decode, the Fluxion sampler denoises
    (with the Fluxion model of the same file) from core's Empty Latent Image."""
    return {
        "1": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "3": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a lighthouse on a cliff at sunset", "clip": ["2", 1]},
        },
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry, low quality", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": sampler(["1", 0], ["5", 0], positive=["3", 0], negative=["4", 0]),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["2", 2]}},
        "8": {
            "class_type": "SaveImage",
            "inputs": {"images": ["7", 0], "filename_prefix": "fluxion_core_clip_vae"},
        },
    }


def hires_fix(
    model: list, latent: list, scale_by: float, steps: int = 8, denoise: float = 0.5, seed: int = 43
) -> dict:
    return {
        "class_type": "FluxionHiresFix",
        "inputs": {
            "model": model,
            "positive": ["2", 0],
            "negative": ["3", 0],
            "latent": latent,
            "scale_by": scale_by,
            "upscale_method": "nearest-exact",
            "seed": seed,
            "steps": steps,
            "cfg": 7.0,
            "solver": "dpmpp_2m",
            "schedule": "karras",
            "denoise": denoise,
        },
    }


def sd15_hires_fix() -> dict:
    """Hires fix in one node: a 512 px first pass, upscaled 1.5x in latent space and sampled again at denoise 0.5."""
    return {
        **sd15_base("a cottage by a lake at dawn, detailed"),
        "4": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "5": sampler(["1", 0], ["4", 0]),
        "6": hires_fix(["1", 0], ["5", 0], 1.5),
        **decode_and_save(["6", 0], "fluxion_hires_fix", 7),
    }


def sd15_tiled_upscale() -> dict:
    """Tiled upscaling (MultiDiffusion): the 512 px first pass is the ControlNet hint (tile-style: the image itself)
    of a LoRA + ControlNet model sampled in 512 px tiles overlapping by 128 px, 2x larger (9 tiles a step)."""
    prompt = sd15_base("a cottage by a lake at dawn, fluxion style, detailed")
    prompt["2"]["inputs"]["clip"] = ["4", 1]
    prompt["3"]["inputs"]["clip"] = ["4", 1]
    return {
        **prompt,
        "4": {
            "class_type": "FluxionLoraLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "lora_name": "fluxion_demo_lora.safetensors",
                "strength_model": 0.8,
                "strength_clip": 1.0,
                "fuse": False,
            },
        },
        "5": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "6": sampler(["4", 0], ["5", 0]),
        "7": {
            "class_type": "FluxionVAEDecode",
            "inputs": {"vae": ["1", 2], "samples": ["6", 0], "tiled": False},
        },
        "8": {
            "class_type": "FluxionControlLoader",
            "inputs": {"control_name": "control_v11p_sd15_canny.safetensors"},
        },
        "9": {
            "class_type": "FluxionApplyControl",
            "inputs": {
                "model": ["4", 0],
                "control": ["8", 0],
                "image": ["7", 0],
                "strength": 0.6,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "mode": "balanced",
            },
        },
        "10": {
            "class_type": "FluxionTiledDiffusion",
            "inputs": {
                "model": ["9", 0],
                "tile_width": 512,
                "tile_height": 512,
                "overlap": 128,
                "blend": "uniform",
            },
        },
        "11": hires_fix(["10", 0], ["6", 0], 2.0, steps=10, denoise=0.4),
        **decode_and_save(["11", 0], "fluxion_tiled_upscale", 12),
    }


SDXL = "sd_xl_base_1.0.safetensors"


def sdxl_base(positive: str, negative: str, size: int) -> dict:
    conditioning = {
        "clip_skip": 1,
        "width": size,
        "height": size,
        "crop_w": 0,
        "crop_h": 0,
        "target_width": size,
        "target_height": size,
    }
    return {
        "1": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": SDXL}},
        "2": {
            "class_type": "FluxionCLIPTextEncodeSDXL",
            "inputs": {"clip": ["1", 1], "text": positive, **conditioning},
        },
        "3": {
            "class_type": "FluxionCLIPTextEncodeSDXL",
            "inputs": {"clip": ["1", 1], "text": negative, **conditioning},
        },
    }


def sdxl_txt2img() -> dict:
    return {
        **sdxl_base("an astronaut riding a horse on mars, cinematic", "lowres, watermark", 1024),
        "4": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "5": sampler(["1", 0], ["4", 0], steps=4),
        **decode_and_save(["5", 0], "fluxion_sdxl_txt2img", 6),
    }


def sdxl_img2img() -> dict:
    return {
        **sdxl_base("a detailed oil painting", "lowres", 1024),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {"class_type": "FluxionVAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["4", 0]}},
        "6": sampler(["1", 0], ["5", 0], steps=6, denoise=0.5),
        **decode_and_save(["6", 0], "fluxion_sdxl_img2img", 7),
    }


def sdxl_ip_adapter() -> dict:
    return {
        **sdxl_base("a portrait in the style of the reference, cinematic", "lowres, watermark", 1024),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter_sdxl.safetensors"},
        },
        "6": {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors"},
        },
        "7": apply_ip_adapter(["1", 0], ["5", 0], 0.7, clip_vision=["6", 0], image=["4", 0]),
        "8": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "9": sampler(["7", 0], ["8", 0], steps=4),
        **decode_and_save(["9", 0], "fluxion_sdxl_ip_adapter", 10),
    }


UNION_PROMAX = "controlnet-union-sdxl-1.0/diffusion_pytorch_model_promax.safetensors"


def sdxl_controlnet_union() -> dict:
    """ControlNet Union ProMax, core-style: Set Union ControlNet Type (canny) -> Apply Control."""
    return {
        **sdxl_base("a glass house in a forest, photograph", "lowres, watermark", 1024),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionCanny",
            "inputs": {"image": ["4", 0], "low_threshold": 0.2, "high_threshold": 0.6},
        },
        "6": {"class_type": "FluxionControlLoader", "inputs": {"control_name": UNION_PROMAX}},
        "7": {
            "class_type": "FluxionSetUnionControlNetType",
            "inputs": {"control": ["6", 0], "type": "canny/lineart/anime_lineart/mlsd"},
        },
        "8": {
            "class_type": "FluxionApplyControl",
            "inputs": {
                "model": ["1", 0],
                "control": ["7", 0],
                "image": ["5", 0],
                "strength": 0.8,
                "start_percent": 0.0,
                "end_percent": 0.9,
                "mode": "balanced",
            },
        },
        "9": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "10": sampler(["8", 0], ["9", 0], steps=4),
        **decode_and_save(["10", 0], "fluxion_sdxl_controlnet_union", 11),
    }


def sdxl_guidance() -> dict:
    """SDXL with self-attention guidance and FreeU (ComfyUI's defaults)."""
    return {
        **sdxl_base("a red fox in a misty meadow at dawn, photograph", "lowres, watermark", 1024),
        "4": {
            "class_type": "FluxionFreeU",
            "inputs": {"model": ["1", 0], "b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2, "blocks": "channels"},
        },
        "5": {
            "class_type": "FluxionSelfAttentionGuidance",
            "inputs": {"model": ["4", 0], "scale": 0.5, "blur_sigma": 2.0},
        },
        "6": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "7": sampler(["5", 0], ["6", 0], steps=4),
        **decode_and_save(["7", 0], "fluxion_sdxl_guidance", 8),
    }


def apply_faceid(model: list, ipadapter: list, face_embeds: list, **inputs: object) -> dict:
    return {
        "class_type": "FluxionApplyIPAdapterFaceID",
        "inputs": {
            "model": model,
            "ipadapter": ipadapter,
            "face_embeds": face_embeds,
            "weight": 0.85,
            "weight_faceidv2": 1.0,
            "weight_type": "linear",
            "combine": "concat",
            "start_percent": 0.0,
            "end_percent": 1.0,
            "lora_name": "None",
            "lora_strength": 0.6,
            "face_weights": "",
            "outside_mask": "blend",
            "weight_composition": 1.0,
            "layer_weights": "",
            **inputs,
        },
    }


def ip_adapter_faceid() -> dict:
    """IP-Adapter FaceID Plus v2: an insightface embedding saved beforehand (example_face.npy in the input
    folder), the face crop through CLIP ViT-H, and the release's LoRA on the same model (lora_name)."""
    return {
        **sd15_base("a portrait photo of a person in a garden, best quality"),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter-faceid-plusv2_sd15.bin"},
        },
        "6": {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"},
        },
        "7": {"class_type": "FluxionLoadFaceEmbeds", "inputs": {"face_embeds_name": "example_face.npy"}},
        "8": apply_faceid(
            ["1", 0],
            ["5", 0],
            ["7", 0],
            clip_vision=["6", 0],
            image=["4", 0],
            lora_name="ip-adapter-faceid-plusv2_sd15_lora.safetensors",
        ),
        "9": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "10": sampler(["8", 0], ["9", 0]),
        **decode_and_save(["10", 0], "fluxion_ip_adapter_faceid", 11),
    }


def sdxl_ip_adapter_faceid() -> dict:
    """IP-Adapter FaceID on SDXL: the face embedding alone (no CLIP vision model, no LoRA)."""
    return {
        **sdxl_base("a portrait photo of a person, cinematic", "lowres, watermark", 1024),
        "4": {
            "class_type": "FluxionIPAdapterLoader",
            "inputs": {"ipadapter_name": "ip-adapter-faceid_sdxl.bin"},
        },
        "5": {"class_type": "FluxionLoadFaceEmbeds", "inputs": {"face_embeds_name": "example_face.npy"}},
        "6": apply_faceid(["1", 0], ["4", 0], ["5", 0]),
        "7": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 1024, "height": 1024, "batch_size": 1}},
        "8": sampler(["6", 0], ["7", 0], steps=4),
        **decode_and_save(["8", 0], "fluxion_sdxl_ip_adapter_faceid", 9),
    }


def style_aligned() -> dict:
    """A batch of three sharing image 0's style; a second branch aligned to a reference image's latent."""
    style = {
        "scale": 1.0,
        "adain_queries": True,
        "adain_keys": True,
        "adain_values": False,
        "share_reference": False,
        "start_percent": 0.0,
        "end_percent": 1.0,
    }
    return {
        **sd15_base("a cat, a dog and a bird, flat illustration"),
        "4": {"class_type": "FluxionStyleAligned", "inputs": {"model": ["1", 0], **style}},
        "5": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 3}},
        "6": sampler(["4", 0], ["5", 0]),
        **decode_and_save(["6", 0], "fluxion_style_aligned_batch", 7),
        "9": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "10": {"class_type": "FluxionVAEEncode", "inputs": {"vae": ["1", 2], "pixels": ["9", 0]}},
        "11": {
            "class_type": "FluxionStyleAligned",
            "inputs": {"model": ["1", 0], **style, "reference": ["10", 0]},
        },
        "12": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 64, "height": 64, "batch_size": 2}},
        "13": sampler(["11", 0], ["12", 0]),
        **decode_and_save(["13", 0], "fluxion_style_aligned_reference", 14),
    }


def reference_adain() -> dict:
    workflow = reference_only()
    workflow["5"]["inputs"].update(mode="attn+adain", adain_strength=0.8)
    workflow["9"]["inputs"]["filename_prefix"] = "fluxion_reference_adain"
    return workflow


def speed() -> dict:
    """The opt-in accelerations: DeepCache (default settings) and token merging (ratio 0.5) on SD1.5."""
    return {
        **sd15_base("a lighthouse on a cliff at sunset, oil painting"),
        "4": {
            "class_type": "FluxionDeepCache",
            "inputs": {
                "model": ["1", 0],
                "cache_interval": 3,
                "cache_depth": 1,
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        },
        "5": {"class_type": "FluxionTokenMerging", "inputs": {"model": ["4", 0], "ratio": 0.5, "seed": 0}},
        "6": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "7": sampler(["5", 0], ["6", 0]),
        **decode_and_save(["7", 0], "fluxion_speed", 8),
    }


def sdxl_control_lora() -> dict:
    return {
        **sdxl_base("a glass house in a forest, photograph", "lowres, watermark", 512),
        "4": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "5": {
            "class_type": "FluxionCanny",
            "inputs": {"image": ["4", 0], "low_threshold": 0.2, "high_threshold": 0.6},
        },
        "6": {
            "class_type": "FluxionControlLoader",
            "inputs": {"control_name": "control-lora-canny-rank128.safetensors"},
        },
        "7": {
            "class_type": "FluxionApplyControl",
            "inputs": {
                "model": ["1", 0],
                "control": ["6", 0],
                "image": ["5", 0],
                "strength": 0.9,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "mode": "balanced",
            },
        },
        "8": {"class_type": "FluxionEmptyLatent", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
        "9": sampler(["7", 0], ["8", 0], steps=4),
        **decode_and_save(["9", 0], "fluxion_sdxl_control_lora", 10),
        "12": {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}},
    }


WORKFLOWS = {
    "sd15_txt2img": txt2img,
    "sd15_img2img": img2img,
    "sd15_inpaint": inpaint,
    "sd15_lora": lora,
    "sd15_lora_stack": lora_stack,
    "sd15_regional_lora": regional_lora,
    "sd15_controlnet_canny": controlnet_canny,
    "sd15_ip_adapter": ip_adapter,
    "sd15_ip_adapter_plus_two_images_mask": ip_adapter_plus_two_images_mask,
    "sd15_ip_adapter_controlnet": ip_adapter_controlnet,
    "sd15_ip_adapter_embeds": ip_adapter_embeds,
    "sd15_reference_only": reference_only,
    "sd15_inspect_and_set_context": inspect_and_context,
    "sd15_v_prediction": v_prediction,
    "sd15_guidance": guidance,
    "sdxl_txt2img": sdxl_txt2img,
    "sdxl_img2img": sdxl_img2img,
    "sdxl_ip_adapter": sdxl_ip_adapter,
    "sdxl_guidance": sdxl_guidance,
    "sdxl_controlnet_union": sdxl_controlnet_union,
    "sdxl_control_lora": sdxl_control_lora,
    "sd15_regional_prompt": regional_prompt,
    "sd15_masked_prompt_upscale": masked_prompt_upscale,
    "sd15_inpaint_core_mask": inpaint_core_mask,
    "sd15_style_aligned": style_aligned,
    "sd15_reference_adain": reference_adain,
    "sd15_speed": speed,
    "sd15_ip_adapter_faceid": ip_adapter_faceid,
    "sdxl_ip_adapter_faceid": sdxl_ip_adapter_faceid,
    "sd15_hires_fix": sd15_hires_fix,
    "sd15_tiled_upscale": sd15_tiled_upscale,
}
IN_COMFYUI = {"sd15_core_clip_and_vae": core_clip_and_vae}
"""Workflows holding core nodes that need ComfyUI's own models: they run inside ComfyUI only."""


def build() -> dict[Path, str]:
    """File path -> JSON text of every example, both formats."""
    classes = all_node_classes()
    files = {}
    for folder, workflows in ((FOLDER, WORKFLOWS), (FOLDER / "in_comfyui", IN_COMFYUI)):
        for name, make in workflows.items():
            prompt = make()
            files[folder / f"{name}.api.json"] = json.dumps(prompt, indent=2) + "\n"
            files[folder / f"{name}.json"] = json.dumps(api_to_ui(prompt, classes), indent=2) + "\n"
    return files


if __name__ == "__main__":
    for path, text in build().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(path)
