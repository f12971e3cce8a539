"""The host contract for memory: every model the pack loads is a ModelPatcher loaded with load_models_gpu.

A ComfyUI-shaped fake (`comfy.model_management`, `comfy.model_patcher.ModelPatcher`, `comfy.utils`,
`folder_paths`) stands in for ComfyUI: `nodes.host` is switched to it for a test, the nodes run on the demo's
tiny files, and the fake records what ComfyUI would see: which modules were wrapped (once each, with which
devices and size), which were loaded together and with how much memory, what "Unload models" detached.
"""

import gc
import sys
import types
import weakref
from pathlib import Path

import pytest
import torch

from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CONTROLNET,
    DEMO_IP_ADAPTER,
    DEMO_LORA,
    SD15_CHECKPOINT,
    write_demo_files,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent, FluxionVAEDecode
from nodes.lora_nodes import FluxionLoraLoader
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode

HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root / "models"


class FakeComfy:
    """What the pack reads of ComfyUI's memory manager, and a record of what it was asked."""

    def __init__(self, models: Path) -> None:
        self.patchers: list = []
        self.loads: list[tuple[list, float, bool]] = []
        self.events: list[tuple[str, object]] = []
        self.device = torch.device("cpu")
        self.unet_dtype = torch.float32
        self.text_dtype = torch.float16  # ComfyUI's default; a CPU computes it in fp32 (unet_manual_cast)

        fake = self
        mm = types.ModuleType("comfy.model_management")
        mm.current_loaded_models = []

        class InterruptProcessingException(Exception):
            pass

        mm.InterruptProcessingException = InterruptProcessingException
        mm.interrupt_current_processing = lambda value=True: None
        mm.throw_exception_if_processing_interrupted = lambda: None
        mm.get_torch_device = lambda: fake.device
        mm.unet_offload_device = lambda: torch.device("cpu")
        mm.text_encoder_device = lambda: fake.device
        mm.text_encoder_offload_device = lambda: torch.device("cpu")
        mm.vae_device = lambda: fake.device
        mm.vae_offload_device = lambda: torch.device("cpu")
        mm.unet_dtype = lambda device=None, model_params=0, supported_dtypes=(), weight_dtype=None: (
            fake.unet_dtype
        )
        mm.text_encoder_dtype = lambda device=None: fake.text_dtype
        mm.vae_dtype = lambda device=None, allowed_dtypes=(): torch.float32
        mm.unet_manual_cast = lambda weight_dtype, device, supported_dtypes=(): (
            None if weight_dtype == torch.float32 else torch.float32
        )
        mm.xformers_enabled = lambda: False
        mm.pytorch_attention_flash_attention = lambda: True

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):  # fmt: skip
            fake.loads.append((list(models), memory_required, force_full_load))
            for patcher in models:
                patcher.model.to(patcher.load_device)
                if all(entry.model is not patcher for entry in mm.current_loaded_models):
                    mm.current_loaded_models.insert(0, types.SimpleNamespace(model=patcher))

        def unload_all_models():
            for entry in mm.current_loaded_models:
                entry.model.detach()
            mm.current_loaded_models.clear()

        mm.load_models_gpu = load_models_gpu
        mm.unload_all_models = unload_all_models
        self.mm = mm

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
                self.model, self.load_device, self.offload_device, self.size = (
                    model,
                    load_device,
                    offload_device,
                    size,
                )
                fake.patchers.append(self)

            def detach(self, unpatch_all=True):
                fake.events.append(("detach", self))
                self.model.to(self.offload_device)

        patcher_module = types.ModuleType("comfy.model_patcher")
        patcher_module.ModelPatcher = ModelPatcher

        utils = types.ModuleType("comfy.utils")

        class ProgressBar:
            def __init__(self, total):
                self.total = total

            def update_absolute(self, value, total=None, preview=None):
                fake.events.append(("progress", value))

        utils.ProgressBar = ProgressBar
        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, patcher_module

        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(models)
        folder_paths.supported_pt_extensions = {".safetensors"}
        folder_paths.folder_names_and_paths = {}
        folder_paths.get_folder_paths = lambda kind: list(folder_paths.folder_names_and_paths[kind][0])
        folder_paths.get_filename_list = lambda kind: sorted(
            p.name for d in folder_paths.get_folder_paths(kind) if Path(d).is_dir() for p in Path(d).iterdir()
        )

        def get_full_path(kind, name):
            for folder in folder_paths.get_folder_paths(kind):
                if (Path(folder) / name).is_file():
                    return str(Path(folder) / name)
            return None

        folder_paths.get_full_path = get_full_path
        self.modules = {
            "comfy": comfy,
            "comfy.model_management": mm,
            "comfy.model_patcher": patcher_module,
            "comfy.utils": utils,
            "folder_paths": folder_paths,
        }
        self.host = (mm, utils, folder_paths)

    def patcher_of(self, module: torch.nn.Module):
        found = [patcher for patcher in self.patchers if patcher.model.fluxion_module is module]
        assert len(found) == 1, f"{type(module).__name__} has {len(found)} ModelPatchers"
        return found[0]


@pytest.fixture
def comfy(monkeypatch, demo_models):
    fake = FakeComfy(demo_models)
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(host, "_HOST", fake.host)
    monkeypatch.setattr(host, "HOSTED", True)
    return fake


def _prompted(model, clip, text):
    return FluxionTextEncode().encode(clip, text)[0]


def _wired(comfy_fake=None):
    """Checkpoint + fused LoRA + ControlNet + IP-Adapter (with CLIP vision), as a workflow wires them."""
    model, clip, vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    model, clip, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.8, 0.8, True)
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(model, control, HINT, 0.9, 0.0, 1.0, "balanced")[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(model, ipadapter, clip_vision, HINT, 0.7)[0]
    return model, clip, vae, control.model, ipadapter.model, clip_vision.model


def _sample(model, clip, seed=1):
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    positive, negative = _prompted(model, clip, "a house"), _prompted(model, clip, "blurry")
    return sample_latents(model, positive, negative, latent, seed, 3, 5.0, "euler", "normal", 1.0)


def test_every_model_is_one_model_patcher_loaded_with_load_models_gpu(comfy):
    model, clip, vae, controlnet, ipadapter, encoder = _wired()
    latents = _sample(model, clip)
    FluxionVAEDecode().decode(vae, {"samples": latents})
    sd = model.model
    modules = {
        "unet": sd.unet,
        "text_encoder": sd.text_encoder,
        "vae": sd.autoencoder,
        "controlnet": controlnet,
        "ipadapter": ipadapter.weights,
        "clip_vision": encoder,
    }
    patchers = {role: comfy.patcher_of(module) for role, module in modules.items()}
    assert len(comfy.patchers) == len(modules)  # one each: wires share them, nothing is wrapped twice
    for role, patcher in patchers.items():
        assert patcher.size == host.module_bytes(modules[role]) > 0, role
        assert (patcher.load_device, patcher.offload_device) == (comfy.device, torch.device("cpu")), role
        assert type(patcher.model).__name__ == f"Fluxion{type(modules[role]).__name__}"
    loaded = [(set(map(id, models)), memory) for models, memory, _ in comfy.loads]
    sampling = {id(patchers[role]) for role in ("unet", "controlnet", "ipadapter")}
    assert any(ids == sampling and memory > 0 for ids, memory in loaded), loaded  # together, with room
    first = {
        id(patcher): index
        for index, (models, _, _) in reversed(list(enumerate(comfy.loads)))
        for patcher in models
    }
    assert (
        first[id(patchers["clip_vision"])] < first[id(patchers["text_encoder"])] < first[id(patchers["unet"])]
    )
    assert first[id(patchers["unet"])] < first[id(patchers["vae"])]
    listed = {id(entry.model) for entry in comfy.mm.current_loaded_models}
    assert {id(patcher) for patcher in patchers.values()} <= listed
    assert sorted(host.loaded_model_names()) == sorted(
        [
            f"{SD15_CHECKPOINT} UNet",
            f"{SD15_CHECKPOINT} text encoder 1",
            f"{SD15_CHECKPOINT} VAE",
            DEMO_CONTROLNET,
            DEMO_IP_ADAPTER,
            DEMO_CLIP_VISION,
        ]
    )


def test_after_unload_all_models_the_next_run_loads_again_and_gives_the_same_latents(comfy):
    model, clip, *_ = _wired()
    first = _sample(model, clip)
    loads = len(comfy.loads)
    comfy.mm.unload_all_models()  # "Unload models" / POST /free
    assert comfy.mm.current_loaded_models == [] and host.loaded_model_names() == []
    assert {patcher for event, patcher in comfy.events if event == "detach"} >= {
        comfy.patcher_of(model.model.unet),
        comfy.patcher_of(model.model.text_encoder),
    }
    again = _sample(model, clip)
    assert len(comfy.loads) > loads and comfy.patcher_of(model.model.unet) in comfy.loads[-1][0]
    assert torch.equal(
        first, again
    )  # the same path on the same inputs: the unloaded weights came back intact


def test_the_pack_monkeypatches_nothing_of_comfyui(comfy):
    originals = {
        name: getattr(comfy.mm, name) for name in vars(comfy.mm) if callable(getattr(comfy.mm, name))
    }
    model, clip, *_ = _wired()
    _sample(model, clip)
    comfy.mm.unload_all_models()
    assert {name: getattr(comfy.mm, name) for name in originals} == originals
    assert not hasattr(host, "register_memory_release")


def test_text_encoders_are_stored_in_comfyuis_text_encoder_dtype_and_computed_as_it_would(comfy):
    placement = host.model_placement("text_encoder")
    assert (placement.dtype, placement.compute_dtype) == (torch.float16, torch.float32)  # a CPU: fp32 compute
    assert host.model_placement("clip_vision") == placement  # CLIP vision placed as core places its own
    model, clip, *_ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    encoder = model.model.text_encoder
    assert {p.dtype for p in encoder.parameters()} == {torch.float16}
    conditioning = _prompted(model, clip, "a house")
    assert conditioning[0][0].dtype == torch.float32  # core CONDITIONING: [[embedding, {...}]]
    assert {p.dtype for p in encoder.parameters()} == {torch.float16}  # the stored weights never change


def test_fp8_unet_storage_is_kept_and_computed_in_the_dtype_comfyui_computes_fp8_in(comfy):
    comfy.unet_dtype = torch.float8_e4m3fn  # --fp8_e4m3fn-unet
    placement = host.model_placement("unet")
    assert (placement.dtype, placement.compute_dtype) == (torch.float8_e4m3fn, torch.float32)  # a CPU
    assert host.model_placement("controlnet") == placement  # ControlNets and adapters follow the UNet
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    unet = model.model.unet
    assert {p.dtype for p in unet.parameters()} == {torch.float8_e4m3fn}
    assert host.managed_model(unet).size == sum(p.numel() for p in unet.parameters())  # one byte a weight
    fp8 = _sample(model, clip)

    comfy.unet_dtype = torch.float32  # the same run on float32 weights rounded through fp8
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    with torch.no_grad():
        for parameter in model.model.unet.parameters():
            parameter.copy_(parameter.to(torch.float8_e4m3fn).float())
    reference = _sample(model, clip)
    torch.testing.assert_close(fp8, reference, rtol=1e-5, atol=1e-5)  # each layer casts them exactly so


def test_an_fp8_unet_with_lora_controlnet_and_ip_adapter_runs_and_keeps_its_storage(comfy):
    comfy.unet_dtype = torch.float8_e4m3fn
    model, clip, _, controlnet, ipadapter, _ = _wired()
    latents = _sample(model, clip)
    assert torch.isfinite(latents).all()
    for module in (model.model.unet, controlnet, ipadapter.weights):  # fused LoRA restored bit for bit in fp8
        assert {p.dtype for p in module.parameters()} == {torch.float8_e4m3fn}, type(module).__name__


def _streaming_loads(comfy) -> list[int]:
    """Make the fake's load_models_gpu load like ComfyUI's ModelPatcher.load when memory is short: every other
    weighted layer is left on the offload device and streamed (`comfy_cast_weights = True`)."""
    streamed: list[int] = []
    plain = comfy.mm.load_models_gpu

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):  # fmt: skip
        assert not force_full_load  # ComfyUI may split our models as it splits its own
        plain(models, memory_required, force_patch_weights, minimum_memory_required, force_full_load)
        for patcher in models:
            layers = [m for m in patcher.model.modules() if hasattr(m, "comfy_cast_weights")]
            for layer in layers[::2]:
                layer.comfy_cast_weights = True
            streamed.append(len(layers[::2]))

    comfy.mm.load_models_gpu = load_models_gpu
    return streamed


def test_layers_comfyui_leaves_on_the_offload_device_are_streamed_and_the_run_is_the_same(comfy):
    model, clip, *_ = _wired()
    full = _sample(model, clip)
    comfy.mm.unload_all_models()
    streamed = _streaming_loads(comfy)
    partial = _sample(model, clip)
    unet = model.model.unet
    assert streamed and min(streamed) > 0
    assert (
        sum(layer.comfy_cast_weights for layer in unet.modules() if hasattr(layer, "comfy_cast_weights")) > 0
    )
    assert unet.device == comfy.device  # streamed layers compute on the load device set after the load
    assert torch.equal(full, partial)  # on a CPU the streamed copy is the weight itself: the same operations


def test_hosted_loaders_hold_models_weakly_so_comfyuis_cache_decides(comfy):
    model, clip, vae = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    alive = weakref.ref(model.model)
    assert FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0].model is model.model  # shared while wired
    del model, clip, vae
    gc.collect()
    assert alive() is None  # ComfyUI's output cache let go of the wires: the weights are freed


def test_headless_the_loader_keeps_the_last_checkpoint(monkeypatch, demo_models):
    monkeypatch.setattr(host, "_models_dir", demo_models)
    first = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0].model
    alive = weakref.ref(first)
    del first
    gc.collect()
    assert alive() is not None and FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0].model is alive()


def test_a_fused_lora_keeps_its_backups_on_the_unets_offload_device(comfy, monkeypatch):
    from nodes import lora_nodes

    asked = []
    original = lora_nodes.SDLoraManager.for_models.__func__

    def for_models(cls, unet, *encoders, backup_device="cpu"):
        if not any(encoders):  # the UNet part (the probe and the text part never fuse)
            asked.append(backup_device)
        return original(cls, unet, *encoders, backup_device=backup_device)

    monkeypatch.setattr(lora_nodes.SDLoraManager, "for_models", classmethod(for_models))
    model, clip, *_ = _wired()
    _sample(model, clip)
    assert asked and set(asked) == {comfy.patcher_of(model.model.unet).offload_device}  # unet_offload_device
