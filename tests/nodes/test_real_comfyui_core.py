"""Fluxion models and core models in one real ComfyUI (opt-in, full-size random SD1.5 weights).

Runs when `FLUXION_COMFYUI` (a ComfyUI checkout) and `FLUXION_COMFYUI_PYTHON` are set, like
test_real_comfyui.py; skips cleanly otherwise. It writes a full-size random SD1.5 checkpoint (~1.7 GB, core's
loaders detect real architectures only) and a kohya-named LoRA, starts ComfyUI on the CPU (loopback, a port
from FLUXION_COMFYUI_PORT or a free one) and checks, through /prompt and core SaveLatent files:

- core KSampler (euler / normal, 3 steps, cfg 5, 128 px) on `Fluxion To Core Model` of our loaded checkpoint
  equals core KSampler on core's own MODEL of the same file (core CLIP Text Encode conditioning for both):
  max abs difference of the latents <= 1e-5 of their max abs (see CORE_PARITY);
- with the LoRA, core KSampler on our model + Fluxion Load LoRA equals core KSampler on core's model + core
  LoraLoader (the same LoRA applied by core) within CORE_PARITY, and the LoRA changes the result by far more;
- after the LoRA run, the plain run on the same loaded model gives the first run's latents again
  (torch.equal: same path, same inputs: the stack was undone);
- adopting core's MODEL / CLIP / VAE grows the ComfyUI process's RSS by far less than a second copy (< 10%;
  measured +48 MiB, a second fp32 copy is 4067 MiB), KSampler on the adopted model gives our own load's latents
  exactly, and our sampler, text encoder and VAE decoder run on the adopted weights;
- the examples of examples/comfyui_workflows/ run (their model names replaced by this test's files);
- with a full-size random ControlNet (diffusers layout, read by both), KSampler on core's model + core Apply
  ControlNet equals KSampler on the adopted model + Fluxion Apply Control (1.36e-6 relative, measured) and on
  the adopted model + core Apply ControlNet (1.63e-6: core's `control` residuals mapped onto our UNet), within
  CORE_PARITY, while the ControlNet itself changes the result by 0.045.

Measured on 2026-12-03 (AMD EPYC, 2 threads, ComfyUI 0.8.0): all four pass in ~8 min; relative differences
ours vs core 1.52e-6 (plain) and 1.51e-6 (with the LoRA, whose own effect is 0.25).
"""

import json
from pathlib import Path

import pytest
import torch

from tests.support.comfyui_server import FREE_CACHE, REPO, Server, comfyui_server, needs_comfyui, prepare_base

RUN_TIMEOUT_S = 900
CHECKPOINT = "random_sd15.safetensors"
LORA = "random_sd15_lora.safetensors"
CONTROLNET = "random_sd15_controlnet.safetensors"
HINT = "hint.png"
CORE_PARITY = 1e-5
"""Max abs difference of 3-step latents, ours vs core, relative to the latents' max abs (two float paths:
attention and conv order differ). Measured 1.5e-6 (plain: 5.7e-4 on latents up to 373; random weights give
large latents) and 1.5e-6 (LoRA)."""


def _relative(a, b) -> float:
    return float((a - b).abs().max()) / float(b.abs().max())


pytestmark = needs_comfyui


def _run(server: Server, prompt: dict, free: bool = True) -> dict:
    """Run `prompt`; with `free` after emptying the output cache (loaded models stay: our checkpoint cache too)."""
    return server.run(prompt, "prompt", RUN_TIMEOUT_S, free=FREE_CACHE if free else None)


def _write_hint(path: Path) -> None:
    """A 128x128 hint (the output size: neither side resizes it): bright squares on black."""
    from PIL import Image

    image = Image.new("RGB", (128, 128))
    for corner in ((16, 16), (72, 40), (32, 88)):
        image.paste((255, 255, 255), (*corner, corner[0] + 24, corner[1] + 24))
    image.save(path)


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    from tests.support.full_size import (
        write_random_sd15,
        write_random_sd15_controlnet,
        write_random_sd15_lora,
    )

    base = prepare_base(tmp_path_factory.mktemp("comfyui_core"))
    write_random_sd15(base / "models" / "checkpoints" / CHECKPOINT)
    write_random_sd15_lora(base / "models" / "loras" / LORA)
    write_random_sd15_controlnet(base / "models" / "controlnet" / CONTROLNET)
    _write_hint(base / "input" / HINT)
    with comfyui_server(base) as server:
        yield server


def _sampling_nodes(model: list, prefix: str, suffix: str) -> dict:
    """Core text encoding (core CLIP of node "core"), an empty latent, KSampler and SaveLatent."""
    return {
        f"pos{suffix}": {
            "class_type": "CLIPTextEncode",
            "inputs": {"text": "a red fox", "clip": ["core", 1]},
        },
        f"neg{suffix}": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["core", 1]}},
        f"latent{suffix}": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": 128, "height": 128, "batch_size": 1},
        },
        f"sampler{suffix}": {
            "class_type": "KSampler",
            "inputs": {
                "model": model,
                "seed": 7,
                "steps": 3,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": [f"pos{suffix}", 0],
                "negative": [f"neg{suffix}", 0],
                "latent_image": [f"latent{suffix}", 0],
                "denoise": 1.0,
            },
        },
        f"save{suffix}": {
            "class_type": "SaveLatent",
            "inputs": {"samples": [f"sampler{suffix}", 0], "filename_prefix": f"latents/{prefix}"},
        },
    }


CORE_LOADER = {"core": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}}}
OUR_LOADER = {"ours": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": CHECKPOINT}}}


def _plain_prompt(prefix: str) -> dict:
    return {
        **CORE_LOADER,
        **OUR_LOADER,
        "to_core": {"class_type": "FluxionToCoreModel", "inputs": {"model": ["ours", 0]}},
        **_sampling_nodes(["core", 0], f"{prefix}_core", "_core"),
        **_sampling_nodes(["to_core", 0], f"{prefix}_ours", "_ours"),
    }


def _lora_prompt() -> dict:
    lora_inputs = {"lora_name": LORA, "strength_model": 1.0}
    return {
        **CORE_LOADER,
        **OUR_LOADER,
        "core_lora": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["core", 0], **lora_inputs},
        },
        "our_lora": {
            "class_type": "FluxionLoraLoader",
            "inputs": {
                "model": ["ours", 0],
                "clip": ["ours", 1],
                **lora_inputs,
                "strength_clip": 0.0,
                "fuse": True,
            },
        },
        "to_core": {"class_type": "FluxionToCoreModel", "inputs": {"model": ["our_lora", 0]}},
        **_sampling_nodes(["core_lora", 0], "lora_core", "_core"),
        **_sampling_nodes(["to_core", 0], "lora_ours", "_ours"),
    }


@pytest.fixture(scope="module")
def plain(comfyui):
    entry = _run(comfyui, _plain_prompt("plain"))
    return comfyui.latent(entry, "save_core"), comfyui.latent(entry, "save_ours")


def test_ksampler_on_a_fluxion_model_equals_ksampler_on_cores_model(plain):
    core, ours = plain
    assert core.shape == ours.shape == (1, 4, 16, 16)
    difference = _relative(ours, core)
    print(
        f"plain: max |core - ours| / max |core| = {difference:.3g} (latents up to {float(core.abs().max()):.3g})"
    )
    assert difference <= CORE_PARITY


def test_a_fluxion_lora_acts_in_ksampler_as_cores_lora_and_is_undone(comfyui, plain):
    entry = _run(comfyui, _lora_prompt())
    core, ours = comfyui.latent(entry, "save_core"), comfyui.latent(entry, "save_ours")
    plain_core, plain_ours = plain
    difference = _relative(ours, core)
    effect = _relative(ours, plain_ours)
    print(f"LoRA: relative |core - ours| = {difference:.3g}, relative LoRA effect on ours = {effect:.3g}")
    assert difference <= CORE_PARITY
    assert effect > 1000 * CORE_PARITY and _relative(core, plain_core) > 1000 * CORE_PARITY
    again = _run(comfyui, _plain_prompt("again"))
    assert (comfyui.latent(again, "save_ours") == plain_ours).all()  # same path, same inputs: stack undone


def _core_weights_bytes() -> int:
    from foundationals.clip.config import text_preset
    from foundationals.latent_diffusion.model_config import SD15_AUTOENCODER, SD15_UNET

    counts = 0
    for config, builder in (
        (SD15_UNET, "foundationals.latent_diffusion.unet:UNet"),
        (SD15_AUTOENCODER, "foundationals.latent_diffusion.auto_encoder:LatentDiffusionAutoencoder"),
        (text_preset("clip_l"), "foundationals.clip.text_encoder:CLIPTextEncoder"),
    ):
        import importlib

        module, name = builder.split(":")
        model = getattr(importlib.import_module(module), name)(config, device="meta")
        counts += sum(p.numel() for p in model.parameters())
    return counts * 4  # core on the CPU holds them in fp32


SIZES = {
    "clip_skip": 1,
    "width": 128,
    "height": 128,
    "crop_w": 0,
    "crop_h": 0,
    "target_width": 128,
    "target_height": 128,
}


def _adopt_prompt() -> dict:
    return {
        **CORE_LOADER,
        "adopt": {
            "class_type": "FluxionAdoptCoreModel",
            "inputs": {"model": ["core", 0], "clip": ["core", 1], "vae": ["core", 2]},
        },
        "to_core": {"class_type": "FluxionToCoreModel", "inputs": {"model": ["adopt", 0]}},
        **_sampling_nodes(["to_core", 0], "adopted_core", "_adopted"),
        "fl_pos": {
            "class_type": "FluxionTextEncode",
            "inputs": {"clip": ["adopt", 1], "text": "a red fox", **SIZES},
        },
        "fl_neg": {
            "class_type": "FluxionTextEncode",
            "inputs": {"clip": ["adopt", 1], "text": "blurry", **SIZES},
        },
        "fl_latent": {
            "class_type": "FluxionEmptyLatent",
            "inputs": {"width": 128, "height": 128, "batch_size": 1},
        },
        "fl_sampler": {
            "class_type": "FluxionSampler",
            "inputs": {
                "model": ["adopt", 0],
                "positive": ["fl_pos", 0],
                "negative": ["fl_neg", 0],
                "latent_image": ["fl_latent", 0],
                "seed": 7,
                "steps": 2,
                "cfg": 5.0,
                "solver": "euler",
                "schedule": "normal",
                "denoise": 1.0,
            },
        },
        "fl_decode": {
            "class_type": "FluxionVAEDecode",
            "inputs": {"vae": ["adopt", 2], "samples": ["fl_sampler", 0], "tiled": False},
        },
        "fl_save": {
            "class_type": "SaveImage",
            "inputs": {"images": ["fl_decode", 0], "filename_prefix": "adopted"},
        },
    }


def test_adopting_core_models_shares_their_weights_and_our_sampler_runs(comfyui, plain):
    plain_core, plain_ours = plain
    # start from core's model alone: drop every model and cached output (our own loaded copy included), load
    # core's checkpoint and sample once (the same latent size), then adopt it with core's loader output cached
    comfyui.request("/free", {"unload_models": True, "free_memory": True})
    _run(comfyui, {**CORE_LOADER, **_sampling_nodes(["core", 0], "settle", "_core")}, free=False)
    before = comfyui.rss_bytes()
    entry = _run(comfyui, _adopt_prompt(), free=False)
    after = comfyui.rss_bytes()
    adopted = comfyui.latent(entry, "save_adopted")
    copy = _core_weights_bytes()
    growth = after - before
    print(
        f"adopt: RSS {before / 2**30:.2f} -> {after / 2**30:.2f} GiB (+{growth / 2**20:.0f} MiB; "
        f"a second fp32 copy would be {copy / 2**20:.0f} MiB); "
        f"relative |adopted - core| = {_relative(adopted, plain_core):.3g}, "
        f"equal to our own load: {bool((adopted == plain_ours).all())}"
    )
    assert growth < 0.1 * copy
    assert _relative(adopted, plain_core) <= CORE_PARITY
    assert torch.equal(adopted, plain_ours)  # same weights, same path, same inputs as our own load
    images = entry["outputs"]["fl_save"]["images"]
    assert (
        images
        and (comfyui.base / "output" / images[0].get("subfolder", "") / images[0]["filename"]).is_file()
    )


def test_the_mixed_examples_run(comfyui):
    folder = REPO / "examples" / "comfyui_workflows"
    examples = sorted(folder.glob("*.api.json"))
    assert examples
    for path in examples:
        prompt = json.loads(path.read_text())
        for node in prompt.values():  # this test's files, and a small, short run
            inputs = node["inputs"]
            if "ckpt_name" in inputs:
                inputs["ckpt_name"] = CHECKPOINT
            if "lora_name" in inputs:
                inputs["lora_name"] = LORA
            if node["class_type"] == "EmptyLatentImage":
                inputs.update(width=128, height=128)
            if "steps" in inputs:
                inputs["steps"] = 2
        entry = _run(comfyui, prompt)
        images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
        assert images, f"{path.name} saved no image"
        for image in images:
            assert (comfyui.base / image["type"] / image.get("subfolder", "") / image["filename"]).is_file()


def _controlnet_prompt() -> dict:
    """Core's conditioning, four branches: core's model without and with core's ControlNet, then the adopted
    model (the same weights: no second copy in memory) with the Fluxion ControlNet and with core's."""
    prompt = {**CORE_LOADER}
    prompt["adopt"] = {
        "class_type": "FluxionAdoptCoreModel",
        "inputs": {"model": ["core", 0], "clip": ["core", 1], "vae": ["core", 2]},
    }
    prompt["hint"] = {"class_type": "LoadImage", "inputs": {"image": HINT}}
    prompt["core_cn"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CONTROLNET}}
    prompt["our_cn"] = {"class_type": "FluxionControlLoader", "inputs": {"control_name": CONTROLNET}}
    prompt["our_apply"] = {
        "class_type": "FluxionApplyControl",
        "inputs": {
            "model": ["adopt", 0],
            "control": ["our_cn", 0],
            "image": ["hint", 0],
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
            "mode": "balanced",
        },
    }
    prompt["to_core_cn"] = {"class_type": "FluxionToCoreModel", "inputs": {"model": ["our_apply", 0]}}
    prompt["to_core"] = {"class_type": "FluxionToCoreModel", "inputs": {"model": ["adopt", 0]}}
    for suffix, model, core_control in (
        ("_plain", ["core", 0], False),
        ("_core", ["core", 0], True),
        ("_ours", ["to_core_cn", 0], False),
        ("_mapped", ["to_core", 0], True),
    ):
        nodes = _sampling_nodes(model, f"cn{suffix}", suffix)
        if core_control:
            prompt[f"apply{suffix}"] = {
                "class_type": "ControlNetApplyAdvanced",
                "inputs": {
                    "positive": [f"pos{suffix}", 0],
                    "negative": [f"neg{suffix}", 0],
                    "control_net": ["core_cn", 0],
                    "image": ["hint", 0],
                    "strength": 1.0,
                    "start_percent": 0.0,
                    "end_percent": 1.0,
                },
            }
            nodes[f"sampler{suffix}"]["inputs"].update(
                positive=[f"apply{suffix}", 0], negative=[f"apply{suffix}", 1]
            )
        prompt.update(nodes)
    return prompt


def test_controlnets_act_in_ksampler_on_a_fluxion_model_as_on_cores(comfyui):
    comfyui.request("/free", {"unload_models": True, "free_memory": True})  # drop our own loaded copy
    entry = _run(comfyui, _controlnet_prompt(), free=False)
    plain, core, ours, mapped = (
        comfyui.latent(entry, f"save{s}") for s in ("_plain", "_core", "_ours", "_mapped")
    )
    effect = _relative(core, plain)
    print(
        f"ControlNet: relative |Fluxion CN on ours - core CN on core| = {_relative(ours, core):.3g}, "
        f"|core CN on ours - core CN on core| = {_relative(mapped, core):.3g}, ControlNet effect = {effect:.3g}"
    )
    assert effect > 1000 * CORE_PARITY
    assert _relative(ours, core) <= CORE_PARITY
    assert _relative(mapped, core) <= CORE_PARITY
