"""The step loop copies no mask, hint or adapter tensor again after the first step, resizes nothing, and never
waits for the device (no `.item()`-style host syncs).

On a CPU a copy to the device cannot be seen, so the models run in float64 while masks, hints and images come in
float32 (ComfyUI's): moving one of them to the run's "device and dtype" is a real copy. Every copying `.to()` /
`.float()` / ... is recorded with its source tensor and the step it happened in; a source copied in two steps is a
per-step copy. Resizing (`resize_mask`, `resize_hint`) and reading tensor values on the host (`.item()`, `bool()`,
`int()`, `float()`, `.tolist()`) are counted per step too.
"""

import pytest
import torch

from foundationals.latent_diffusion.adapters import regional
from foundationals.latent_diffusion.adapters.controlnet import model as controlnet_model
from foundationals.latent_diffusion.adapters.ip_adapter import adapter as ip_adapter_module
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.controlnet_union_nodes import FluxionApplyUnionControlNet, FluxionSetUnionControlNetType
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CONTROL_LORA,
    DEMO_CONTROLNET,
    DEMO_FACE_EMBEDS,
    DEMO_FACEID_PLUSV2,
    DEMO_FACEID_PLUSV2_LORA,
    DEMO_IP_ADAPTER,
    DEMO_LORA,
    DEMO_LORA_2,
    DEMO_UNION_CONTROLNET,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
    write_demo_files,
)
from nodes.faceid_nodes import FluxionApplyIPAdapterFaceID, FluxionLoadFaceEmbeds
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionLoraLoader, FluxionRegionalLora
from nodes.reference_only_nodes import FluxionReferenceOnly
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionCLIPTextEncodeSDXL, FluxionTextEncode
from nodes.upscale_nodes import FluxionTiledDiffusion

STEPS = 4
HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))
MASK = torch.zeros(1, 64, 64)
MASK[:, 8:40, 16:56] = 1.0
COPYING = ("to", "float", "double", "half", "bfloat16", "cpu", "cuda", "type")
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root / "models"


@pytest.fixture
def faceid_input(monkeypatch, demo_models):
    monkeypatch.setattr(host, "_input_dir", demo_models.parent / "input")


class StepSpy:
    """Records copies, resizes and host reads with the step (0-based) they happen in, while `active`."""

    def __init__(self) -> None:
        self.step = 0
        self.active = False
        self.copies: dict[int, tuple[torch.Tensor, set[int]]] = {}  # keeps the sources alive: ids stay unique
        self.resizes: list[int] = []
        self.syncs: list[tuple[int, str]] = []

    def copied(self, source: torch.Tensor, result: object) -> None:
        if self.active and result is not source and isinstance(result, torch.Tensor):
            self.copies.setdefault(id(source), (source, set()))[1].add(self.step)

    def repeated(self) -> list[str]:
        return [
            f"{tuple(source.shape)} {source.dtype} copied in steps {sorted(steps)}"
            for source, steps in self.copies.values()
            if len(steps) > 1
        ]


class Progress:
    """Stands in for the node's progress bar: after step `done` the spy is in step `done`."""

    def __init__(self, spy: StepSpy) -> None:
        self.spy, self.total = spy, STEPS

    def update_absolute(self, done: int, preview=None) -> None:
        self.spy.step = done


@pytest.fixture
def spy(monkeypatch):
    spy = StepSpy()
    for name in COPYING:
        original = getattr(torch.Tensor, name)

        def copying(tensor, *args, _original=original, **kwargs):
            result = _original(tensor, *args, **kwargs)
            spy.copied(tensor, result)
            return result

        monkeypatch.setattr(torch.Tensor, name, copying)
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def syncing(tensor, *args, _original=original, _name=name, **kwargs):
            if spy.active:
                spy.syncs.append((spy.step, _name))
            return _original(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, syncing)
    for module in (controlnet_model, ip_adapter_module, regional):
        for name in ("resize_mask", "resize_hint"):
            if hasattr(module, name):
                original = getattr(module, name)

                def resizing(*args, _original=original, **kwargs):
                    if spy.active:
                        spy.resizes.append(spy.step)
                    return _original(*args, **kwargs)

                monkeypatch.setattr(module, name, resizing)
    return spy


@pytest.fixture
def float64_models(monkeypatch, demo_models):
    monkeypatch.setattr(host, "_models_dir", demo_models)
    monkeypatch.setattr(host, "unet_dtype", lambda device: torch.float64)
    monkeypatch.setattr(host, "vae_dtype", lambda device: torch.float64)


def _wire():
    model, clip, vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    assert model.model.unet.dtype == torch.float64
    model, clip, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.8, 0.8, True)  # fused
    model = FluxionRegionalLora().load(model, DEMO_LORA_2, 0.7, 0.0, 1.0, "blend", MASK)[0]  # a region
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(model, control, HINT, 0.9, 0.0, 1.0, "balanced", MASK)[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(model, ipadapter, clip_vision, HINT, 0.7, mask=MASK)[0]
    model = FluxionReferenceOnly().apply(model, vae, HINT, 1.0, 0.5, 0.0, 1.0)[0]
    positive = FluxionTextEncode().encode(clip, "a house")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    return model, positive, negative


@pytest.mark.parametrize("solver", ["euler", "ddim", "dpmpp_2m"])
def test_no_step_after_the_first_copies_resizes_or_syncs(spy, float64_models, solver):
    model, positive, negative = _wire()
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    spy.active = True
    sample_latents(model, positive, negative, latent, 1, STEPS, 5.0, solver, "normal", 1.0, Progress(spy))
    spy.active = False
    assert spy.step == STEPS
    assert spy.repeated() == []
    assert [step for step in spy.resizes if step > 0] == []
    assert [sync for sync in spy.syncs if sync[0] > 0] == []


def test_a_masked_faceid_plus_with_its_lora_copies_nothing_again(spy, float64_models, faceid_input):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    ipadapter = FluxionIPAdapterLoader().load(DEMO_FACEID_PLUSV2)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    face = FluxionLoadFaceEmbeds().load(DEMO_FACE_EMBEDS)[0]
    model = FluxionApplyIPAdapterFaceID().apply(
        model,
        ipadapter,
        face,
        0.8,
        0.7,
        clip_vision=clip_vision,
        image=HINT,
        lora_name=DEMO_FACEID_PLUSV2_LORA,
        mask=MASK,
    )[0]
    positive = FluxionTextEncode().encode(clip, "a portrait")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    spy.active = True
    sample_latents(model, positive, negative, latent, 1, STEPS, 5.0, "euler", "normal", 1.0, Progress(spy))
    spy.active = False
    assert spy.step == STEPS
    assert spy.repeated() == []
    assert [step for step in spy.resizes if step > 0] == []
    assert [sync for sync in spy.syncs if sync[0] > 0] == []


def test_union_controlnet_steps_copy_resize_and_sync_nothing_again(spy, float64_models):
    model, clip, _ = FluxionCheckpointLoader().load(SDXL_CHECKPOINT)
    union = FluxionControlLoader().load(DEMO_UNION_CONTROLNET)[0]
    typed = FluxionSetUnionControlNetType().set_type(union, "depth")[0]
    model = FluxionApplyControl().apply(model, typed, HINT, 0.9, 0.0, 1.0, "balanced", MASK)[0]
    model = FluxionApplyUnionControlNet().apply(
        model, union, HINT, "openpose", 0.7, 1.0, 0.0, 1.0, "balanced", HINT.flip(1), "tile", 0.5
    )[0]
    positive = FluxionTextEncode().encode(clip, "a house")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    spy.active = True
    sample_latents(model, positive, negative, latent, 1, STEPS, 5.0, "euler", "normal", 1.0, Progress(spy))
    spy.active = False
    assert spy.step == STEPS
    # SDXL's (2, 6) size/crop time ids are cast to float32 by every sinusoidal embedding in each step (the plain
    # SDXL UNet does it too, with no control: only this float64 harness sees it as a copy; float32 ids are not
    # copied). Everything the union ControlNet prepares is copied once.
    assert [line for line in spy.repeated() if not line.startswith("(2, 6) torch.float64")] == []
    assert [step for step in spy.resizes if step > 0] == []
    assert [sync for sync in spy.syncs if sync[0] > 0] == []


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m"])
def test_tiled_sampling_prepares_each_tile_once(spy, float64_models, solver):
    # tiles (Fluxion Tiled Diffusion): the ControlNet hint and mask are cut once per tile in the first step
    model, clip, vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    model, clip, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.8, 0.8, False)
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(model, control, HINT, 0.9, 0.0, 1.0, "balanced", MASK)[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(model, ipadapter, clip_vision, HINT, 0.7)[0]
    model = FluxionReferenceOnly().apply(model, vae, HINT, 1.0, 0.5, 0.0, 1.0)[0]
    model = FluxionTiledDiffusion().apply(model, 64, 64, 16, "gaussian")[0]
    positive = FluxionTextEncode().encode(clip, "a house")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    latent = FluxionEmptyLatent().generate(128, 96, 1)[0]
    spy.active = True
    sample_latents(model, positive, negative, latent, 1, STEPS, 5.0, solver, "normal", 1.0, Progress(spy))
    spy.active = False
    assert spy.step == STEPS
    assert spy.repeated() == []
    assert [step for step in spy.resizes if step > 0] == []
    assert [sync for sync in spy.syncs if sync[0] > 0] == []


def _sdxl_steps(spy: StepSpy, with_control_lora: bool) -> StepSpy:
    model, clip, _ = FluxionCheckpointLoader().load(SDXL_CHECKPOINT)
    if with_control_lora:
        control = FluxionControlLoader().load(DEMO_CONTROL_LORA)[0]
        model = FluxionApplyControl().apply(model, control, HINT, 0.9, 0.0, 1.0, "balanced", MASK)[0]
    encode = FluxionCLIPTextEncodeSDXL().encode
    positive = encode(clip, "a house", 1, 64, 64, 0, 0, 64, 64)[0]
    negative = encode(clip, "blurry", 1, 64, 64, 0, 0, 64, 64)[0]
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    spy.active = True
    sample_latents(model, positive, negative, latent, 1, STEPS, 5.0, "euler", "normal", 1.0, Progress(spy))
    spy.active = False
    assert spy.step == STEPS
    return spy


def test_a_control_lora_adds_no_per_step_copy_to_an_sdxl_run(spy, float64_models):
    """Its ControlNet is built once, when the run starts. (The SDXL UNet itself re-embeds its (B, 6) size ids
    each step; the Control-LoRA run is compared with the plain SDXL run, so only what it adds counts.)"""
    controlled = _sdxl_steps(spy, True)
    repeated = controlled.repeated()
    controlled_resizes = [step for step in controlled.resizes if step > 0]
    controlled_syncs = [sync for sync in controlled.syncs if sync[0] > 0]
    spy.copies.clear()
    spy.resizes.clear()
    spy.syncs.clear()
    spy.step = 0
    baseline = _sdxl_steps(spy, False)
    assert repeated == baseline.repeated()
    assert controlled_resizes == [] and controlled_syncs == []
