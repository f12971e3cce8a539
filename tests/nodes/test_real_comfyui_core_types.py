"""The pack with ComfyUI's own nodes and types, in a real ComfyUI on full-size random SD1.5 weights (opt-in).

Runs when `FLUXION_COMFYUI` names a ComfyUI checkout (and `FLUXION_COMFYUI_PYTHON` its python), like
test_real_comfyui.py; core's loaders detect real architectures only, so the checkpoint is a full-size SD1.5 file
with random weights (tests/support/full_size_sd15.py, about 2 GB, written once per run). A test-only node pack
(tests/support/comfyui_probe) saves LATENT and IMAGE values as tensors for the assertions. It shows:

- core KSampler (euler, normal) and the Fluxion Sampler (euler, linspace: the same sigmas) on the same core
  CONDITIONING (CLIP Text Encode, Set Area, Set Timestep Range, Set Mask, Combine) and the same core VAE Encode
  latent agree (two prompts, so that one full-size UNet at a time is in memory);
- core VAE Decode and Fluxion VAE Decode of the Fluxion sampler's latents agree within 1/255;
- the examples mixing core and Fluxion nodes run (shrunk to 128 pixels and 2 steps);
- the headless stand-ins declare core's nodes as core does, and the web extension is served.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nodes.core_stand_ins import CORE_STAND_INS, HOSTED_ONLY
from tests.support.comfyui_server import comfyui_server, needs_comfyui, prepare_base
from tests.support.full_size_sd15 import write_random_sd15

pytestmark = needs_comfyui

REPO = Path(__file__).resolve().parents[2]
WORKFLOWS = REPO / "examples" / "workflows"
MIXED_EXAMPLES = [
    WORKFLOWS / "sd15_regional_prompt.api.json",
    WORKFLOWS / "sd15_masked_prompt_upscale.api.json",
    WORKFLOWS / "sd15_inpaint_core_mask.api.json",
    WORKFLOWS / "in_comfyui" / "sd15_core_clip_and_vae.api.json",
]
SD15 = "v1-5-pruned-emaonly.safetensors"
CLIP_FILE, VAE_FILE = (
    "sd15_clip_l.safetensors",
    "sd15_vae.safetensors",
)  # the checkpoint's CLIP-L and VAE alone
RUN_TIMEOUT_S = 1500
# Fluxion Sampler against core KSampler on the same weights, conditioning and latent (fp32, CPU): measured max
# abs difference 8.0e-5 on unscaled latents reaching 34 (relative 2.3e-6; AMD EPYC, 2026-12); the bound leaves
# room for the spread between CPU kinds. Core vs Fluxion VAE Decode: measured 1.6e-6, bound 1/255.
SAMPLER_TOLERANCE = 2e-4
DECODE_TOLERANCE = 1 / 255


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    from nodes.demo import write_demo_files

    base = prepare_base(
        tmp_path_factory.mktemp("comfyui_core_types"),
        {"fluxion_test_probe": REPO / "tests" / "support" / "comfyui_probe"},
    )
    checkpoint = write_random_sd15(base / "models" / "checkpoints" / SD15)
    write_parts(checkpoint, base / "models")
    demo = tmp_path_factory.mktemp("demo_inputs")
    write_demo_files(demo / "models", base / "input")  # the examples' input pictures (its tiny models unused)
    picture = np.zeros((128, 128, 4), dtype=np.uint8)
    yy, xx = np.mgrid[:128, :128]
    picture[..., 0], picture[..., 1], picture[..., 2] = xx * 2, yy * 2, 128
    picture[..., 3] = np.where(
        (yy - 64) ** 2 + (xx - 40) ** 2 < 30**2, 0, 255
    )  # a transparent disc: the mask
    Image.fromarray(picture, mode="RGBA").save(base / "input" / "parity.png")
    with comfyui_server(base) as server:
        yield server


def write_parts(checkpoint: Path, models: Path) -> None:
    """The checkpoint's CLIP-L (transformers keys) and VAE (LDM keys) as files of their own, for core's CLIPLoader
    and VAELoader: the same tensors, without a second UNet in memory."""
    parts = {
        "text_encoders": ("cond_stage_model.transformer.", CLIP_FILE),
        "vae": ("first_stage_model.", VAE_FILE),
    }
    with safe_open(str(checkpoint), framework="pt") as source:
        for folder, (prefix, name) in parts.items():
            tensors = {
                key[len(prefix) :]: source.get_tensor(key) for key in source.keys() if key.startswith(prefix)
            }
            (models / folder).mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(models / folder / name))


def probe(name: str, **values: list) -> dict:
    return {"class_type": "TestProbeSaveTensors", "inputs": {"name": name, **values}}


def conditioning_graph(clip: list, vae: list) -> dict:
    """Core conditioning (CLIP Text Encode, Set Area, Set Timestep Range, Set Mask, Combine) and a core VAE
    Encode latent: positive "11", negative "12", latent "14"."""

    def text(words: str) -> dict:
        return {"class_type": "CLIPTextEncode", "inputs": {"text": words, "clip": clip}}

    return {
        "3": text("a lighthouse on a cliff"),
        "4": text("a red sailing boat"),
        "5": {
            "class_type": "ConditioningSetArea",
            "inputs": {
                "conditioning": ["4", 0],
                "width": 64,
                "height": 128,
                "x": 64,
                "y": 0,
                "strength": 0.8,
            },
        },
        "6": text("a stormy sky"),
        "7": {
            "class_type": "ConditioningSetTimestepRange",
            "inputs": {"conditioning": ["6", 0], "start": 0.0, "end": 0.7},
        },
        "8": {
            "class_type": "ConditioningSetMask",
            "inputs": {
                "conditioning": ["7", 0],
                "mask": ["13", 1],
                "strength": 0.7,
                "set_cond_area": "default",
            },
        },
        "10": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["3", 0], "conditioning_2": ["5", 0]},
        },
        "11": {
            "class_type": "ConditioningCombine",
            "inputs": {"conditioning_1": ["10", 0], "conditioning_2": ["8", 0]},
        },
        "12": text("blurry"),
        "13": {"class_type": "LoadImage", "inputs": {"image": "parity.png"}},
        "14": {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": vae}},
    }


SAMPLING = {"positive": ["11", 0], "negative": ["12", 0], "latent_image": ["14", 0], "seed": 7, "cfg": 5.0}


def core_prompt() -> dict:
    """Core's own pipeline: Load Checkpoint, the conditioning graph, KSampler (euler, normal, denoise 0.5)."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        **conditioning_graph(["1", 1], ["1", 2]),
        "15": {
            "class_type": "KSampler",
            "inputs": dict(
                SAMPLING, model=["1", 0], steps=5, sampler_name="euler", scheduler="normal", denoise=0.5
            ),
        },
        "20": probe("core_sampler", latent=["15", 0]),
        "21": probe("core_inputs", latent=["14", 0], conditioning=["11", 0]),
    }


def fluxion_prompt() -> dict:
    """The same conditioning graph (core CLIP and VAE of the same weights, from their own files) into the Fluxion
    Sampler (euler, linspace: the same sigmas); its latents through core VAE Decode and Fluxion VAE Decode."""
    fluxion = dict(SAMPLING, model=["2", 0], steps=10, solver="euler", schedule="linspace", denoise=0.5)
    return {
        "0": {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP_FILE, "type": "stable_diffusion"}},
        "1": {"class_type": "VAELoader", "inputs": {"vae_name": VAE_FILE}},
        "2": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": SD15}},
        **conditioning_graph(["0", 0], ["1", 0]),
        "16": {"class_type": "FluxionSampler", "inputs": fluxion},
        "17": {"class_type": "VAEDecode", "inputs": {"samples": ["16", 0], "vae": ["1", 0]}},
        "18": {
            "class_type": "FluxionVAEDecode",
            "inputs": {"vae": ["2", 2], "samples": ["16", 0], "tiled": False},
        },
        "19": {"class_type": "FluxionSampler", "inputs": dict(fluxion, positive=["3", 0])},
        "22": probe("fluxion_sampler", latent=["16", 0], image=["18", 0]),
        "23": probe("core_decode", image=["17", 0]),
        "24": probe("fluxion_plain_prompt", latent=["19", 0]),
        "25": probe("fluxion_inputs", latent=["14", 0], conditioning=["11", 0]),
    }


def test_fluxion_sampler_on_core_conditioning_equals_core_ksampler_and_decodes_as_core(comfyui):
    # two prompts, one after the other: one full-size UNet in memory at a time (core's, then the pack's)
    comfyui.run(core_prompt(), "core KSampler", RUN_TIMEOUT_S)
    comfyui.run(fluxion_prompt(), "Fluxion Sampler", RUN_TIMEOUT_S)
    names = (
        "core_sampler",
        "core_inputs",
        "fluxion_sampler",
        "core_decode",
        "fluxion_plain_prompt",
        "fluxion_inputs",
    )
    saved = {name: load_file(comfyui.base / "output" / f"{name}.safetensors") for name in names}
    core_inputs, fluxion_inputs = saved["core_inputs"], saved["fluxion_inputs"]
    assert core_inputs.keys() == fluxion_inputs.keys() and len(core_inputs) == 5  # latent, 3 entries, 1 mask
    for key in core_inputs:  # both samplers got the same conditioning and latent
        assert torch.equal(core_inputs[key], fluxion_inputs[key]), key
    core, ours = saved["core_sampler"]["samples"], saved["fluxion_sampler"]["samples"]
    assert core.shape == ours.shape == (1, 4, 16, 16)
    difference = (core - ours).abs().max().item()
    print(
        f"KSampler vs Fluxion Sampler: max abs difference {difference:.2e}, latent max {core.abs().max():.2f}"
    )
    assert difference <= SAMPLER_TOLERANCE
    # the conditioning entries matter: the base prompt alone lands far away, the input is far away too
    assert (saved["fluxion_plain_prompt"]["samples"] - ours).abs().max() > 100 * SAMPLER_TOLERANCE
    assert (core_inputs["samples"] - ours).abs().max() > 100 * SAMPLER_TOLERANCE
    core_image, our_image = saved["core_decode"]["image"], saved["fluxion_sampler"]["image"]
    assert core_image.shape == our_image.shape == (1, 128, 128, 3)
    assert 0.02 < core_image.std() and 0.05 < core_image.mean() < 0.95  # an image, not a clipped one
    decode_difference = (core_image - our_image).abs().max().item()
    print(f"core VAE Decode vs Fluxion VAE Decode: max abs difference {decode_difference:.2e}")
    assert decode_difference <= DECODE_TOLERANCE


def shrunk(prompt: dict, factor: int = 4, steps: int = 2) -> dict:
    """The example at a quarter of its pixel sizes and 2 steps: full-size weights on a CPU."""
    prompt = json.loads(json.dumps(prompt))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in (
            "EmptyLatentImage",
            "FluxionEmptyLatent",
            "LatentUpscale",
            "ConditioningSetArea",
        ):
            for key in ("width", "height", "x", "y"):
                if isinstance(inputs.get(key), int):
                    inputs[key] = max(inputs[key] // factor, 64 if key in ("width", "height") else 0)
        if node["class_type"] == "FluxionSampler":
            inputs["steps"] = steps
    return prompt


@pytest.mark.parametrize(
    "example", MIXED_EXAMPLES, ids=[p.name.removesuffix(".api.json") for p in MIXED_EXAMPLES]
)
def test_examples_mixing_core_and_fluxion_nodes_run(comfyui, example):
    prompt = shrunk(json.loads(example.read_text()))
    entry = comfyui.run(prompt, example.name, RUN_TIMEOUT_S)
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    assert images, entry["outputs"]
    for image in images:
        path = comfyui.base / image["type"] / image.get("subfolder", "") / image["filename"]
        assert path.is_file() and path.stat().st_size > 0, path


def _declared(definition: dict) -> dict:
    """Inputs by section and name (in order) with their type and widget options, as /object_info gives them."""
    declared = {}
    for section in ("required", "optional"):
        for name, entry in (definition.get(section) or {}).items():
            kind = entry[0] if isinstance(entry[0], str) else "COMBO"
            options = entry[1] if len(entry) > 1 else {}
            choices = entry[0] if isinstance(entry[0], list) else options.get("options")
            widget = {k: options[k] for k in ("default", "min", "max", "step") if k in options}
            declared[(section, name)] = (kind, widget, None if name == "ckpt_name" else choices)
    return declared


@pytest.mark.parametrize("name", sorted({**CORE_STAND_INS, **HOSTED_ONLY}))
def test_headless_stand_ins_declare_core_nodes_as_comfyui_does(comfyui, name):
    theirs = comfyui.request(f"/object_info/{name}", timeout=60)[name]
    ours = {**CORE_STAND_INS, **HOSTED_ONLY}[name]
    mine = json.loads(json.dumps(ours.INPUT_TYPES()))
    assert list(_declared(mine)) == list(_declared(theirs["input"]))  # same inputs, same order
    for key, (kind, widget, choices) in _declared(mine).items():
        their_kind, their_widget, their_choices = _declared(theirs["input"])[key]
        assert kind == their_kind and choices == their_choices, key
        assert {k: v for k, v in their_widget.items() if k in widget} == widget, key
    assert list(ours.RETURN_TYPES) == list(theirs["output"])


def test_the_web_extension_is_served(comfyui):
    scripts = comfyui.request("/extensions")
    ours = [path for path in scripts if path.startswith("/extensions/ComfyUI-Fluxion/")]
    assert ours == ["/extensions/ComfyUI-Fluxion/fluxion.js"], scripts
    assert comfyui.fetch(ours[0]) == (REPO / "web" / "fluxion.js").read_bytes()
