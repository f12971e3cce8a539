"""nodes.host: standalone fallbacks, and delegation to ComfyUI when it is the host."""

import importlib.util
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from PIL import Image

from nodes import host


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_headless_without_comfyui():
    assert not host.is_hosted()
    assert host.unet_dtype(torch.device("cpu")) == torch.float32
    assert host.vae_dtype(torch.device("cpu")) == torch.float32
    assert host.unet_dtype(torch.device("cuda")) == torch.float16


def test_device_can_be_forced(monkeypatch):
    monkeypatch.setenv("FLUXION_DEVICE", "cpu")
    assert host.get_torch_device() == torch.device("cpu")


def test_progress_in_a_log_file_prints_one_final_line():
    stream = io.StringIO()
    with host.ProgressReporter(4, "sampling", stream=stream) as progress:
        for _ in range(3):
            progress.update()
        assert stream.getvalue() == ""
        progress.update()
    assert stream.getvalue().startswith("sampling [" + "#" * 30 + "] 4/4 ")
    assert stream.getvalue().count("\n") == 1


def test_progress_on_a_terminal_redraws_one_line():
    stream = FakeTerminal()
    progress = host.ProgressReporter(2, stream=stream)
    progress.update(preview=Image.new("RGB", (8, 8)))  # previews are for ComfyUI only
    progress.update()
    progress.close()
    lines = stream.getvalue().split("\r")
    assert lines[1].startswith("[" + "#" * 15 + "." * 15 + "] 1/2")
    assert lines[-1].startswith("[" + "#" * 30 + "] 2/2") and lines[-1].endswith("\n")


def test_progress_closed_early_still_ends_its_line():
    stream = io.StringIO()
    with host.ProgressReporter(10, stream=stream) as progress:
        progress.update(3)
    assert "] 3/10 " in stream.getvalue() and stream.getvalue().endswith("\n")


def test_cancel_raises_once_then_clears():
    host.throw_if_interrupted()
    host.request_cancel()
    with pytest.raises(host.Cancelled):
        host.throw_if_interrupted()
    host.throw_if_interrupted()


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def test_model_folders_are_comfyuis_names():
    assert {"checkpoints", "loras", "controlnet", "clip_vision", "ipadapter", "embeddings", "vae"} <= set(
        host.model_folder_names()
    )


def test_list_model_files_walks_subfolders_and_keeps_model_extensions(headless_folders):
    models = headless_folders["models"]
    touch(models / "checkpoints" / "sd15.safetensors")
    touch(models / "checkpoints" / "sdxl" / "base.ckpt")
    touch(models / "checkpoints" / "README.txt")
    assert host.list_model_files("checkpoints") == ["sd15.safetensors", "sdxl/base.ckpt"]
    assert (
        host.model_file_path("checkpoints", "sdxl/base.ckpt") == models / "checkpoints" / "sdxl" / "base.ckpt"
    )


def test_t2i_adapters_live_with_controlnets(headless_folders):
    models = headless_folders["models"]
    touch(models / "controlnet" / "canny.safetensors")
    touch(models / "t2i_adapter" / "sketch.safetensors")
    assert host.list_model_files("controlnet") == ["canny.safetensors", "sketch.safetensors"]
    assert host.model_file_path("controlnet", "sketch.safetensors").parent.name == "t2i_adapter"


def test_missing_model_file_lists_what_exists(headless_folders):
    touch(headless_folders["models"] / "loras" / "a.safetensors")
    touch(headless_folders["models"] / "loras" / "b.safetensors")
    with pytest.raises(host.ModelFileNotFoundError) as caught:
        host.model_file_path("loras", "c.safetensors")
    assert str(caught.value) == (
        f"loras model 'c.safetensors' not found in {headless_folders['models'] / 'loras'}; "
        "available loras: a.safetensors, b.safetensors"
    )
    assert isinstance(caught.value, FileNotFoundError)


def test_missing_model_in_a_missing_folder_says_so(headless_folders):
    with pytest.raises(host.ModelFileNotFoundError) as caught:
        host.model_file_path("ipadapter", "ip-adapter_sd15.safetensors")
    assert str(caught.value) == (
        f"ipadapter model 'ip-adapter_sd15.safetensors' not found in {headless_folders['models'] / 'ipadapter'} "
        "(no such folder)"
    )


def test_missing_model_says_where_the_file_is_when_it_lies_elsewhere_under_the_models_folder(
    headless_folders,
):
    models = headless_folders["models"]
    touch(models / "checkpoints" / "other.safetensors")
    touch(models / "sd15.safetensors")  # directly in models/, not in models/checkpoints/
    with pytest.raises(host.ModelFileNotFoundError) as caught:
        host.model_file_path("checkpoints", "sd15.safetensors")
    assert str(caught.value) == (
        f"checkpoints model 'sd15.safetensors' not found in {models / 'checkpoints'}; "
        f"it is at {models / 'sd15.safetensors'}: move it into {models / 'checkpoints'}"
    )


def test_model_file_lists_remember_their_kind_and_stay_plain_lists(headless_folders):
    touch(headless_folders["models"] / "loras" / "a.safetensors")
    names = host.list_model_files("loras")
    assert names == ["a.safetensors"] and names.kind == "loras"
    assert json.dumps({"names": names}) == '{"names": ["a.safetensors"]}'


def test_model_names_cannot_leave_their_folder(headless_folders):
    touch(headless_folders["models"] / "secret.safetensors")
    with pytest.raises(host.ModelFileNotFoundError, match="must be a path inside"):
        host.model_file_path("loras", "../secret.safetensors")


def test_unknown_model_folder_kind():
    with pytest.raises(ValueError, match="unknown model folder 'upscalers'"):
        host.list_model_files("upscalers")


def test_diffusers_models_are_folders_with_a_model_index(headless_folders):
    touch(headless_folders["models"] / "diffusers" / "tiny-sd" / "model_index.json")
    touch(headless_folders["models"] / "diffusers" / "junk" / "notes.txt")
    assert host.list_model_files("diffusers") == ["tiny-sd"]
    assert host.model_file_path("diffusers", "tiny-sd").is_dir()


def test_directories_headless(headless_folders):
    assert host.output_directory() == headless_folders["output"]
    assert host.input_directory() == headless_folders["input"]
    assert host.temp_directory() == headless_folders["temp"]


# --- hosted: the same module with fake ComfyUI modules importable ---------------------------


@pytest.fixture
def hosted(monkeypatch, tmp_path):
    """nodes/host.py loaded afresh while fake comfy.model_management, comfy.utils, folder_paths exist."""
    events = []
    mm = types.ModuleType("comfy.model_management")

    class InterruptProcessingException(Exception):
        pass

    mm.InterruptProcessingException = InterruptProcessingException
    mm.interrupted = False
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.unet_dtype = lambda device=None, model_params=0, supported_dtypes=(), weight_dtype=None: torch.bfloat16
    mm.vae_dtype = lambda device=None, allowed_dtypes=(): allowed_dtypes[0]
    mm.interrupt_current_processing = lambda value=True: setattr(mm, "interrupted", value)

    def throw_exception_if_processing_interrupted():
        if mm.interrupted:
            mm.interrupted = False
            raise InterruptProcessingException()

    mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
    mm.free_memory = lambda memory_required, device, keep_loaded=(): events.append(("free", memory_required))
    mm.unload_all_models = lambda: mm.free_memory(1e30, mm.get_torch_device())
    mm.get_free_memory = lambda dev=None: 1000
    mm.soft_empty_cache = lambda force=False: events.append("soft_empty_cache")

    utils = types.ModuleType("comfy.utils")

    class ProgressBar:
        def __init__(self, total):
            self.total = total
            events.append(("bar", total))

        def update_absolute(self, value, total=None, preview=None):
            events.append(("progress", value, total, preview))

    utils.ProgressBar = ProgressBar
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils = mm, utils

    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(tmp_path / "comfy_models")
    folder_paths.supported_pt_extensions = {".safetensors", ".ckpt"}
    folder_paths.folder_names_and_paths = {
        "loras": ([str(tmp_path / "comfy_models" / "loras")], {".safetensors"})
    }
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
    folder_paths.get_output_directory = lambda: str(tmp_path / "comfy_output")
    folder_paths.get_input_directory = lambda: str(tmp_path / "comfy_input")
    folder_paths.get_temp_directory = lambda: str(tmp_path / "comfy_temp")
    for name, module in {
        "comfy": comfy,
        "comfy.model_management": mm,
        "comfy.utils": utils,
        "folder_paths": folder_paths,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("hosted_fluxion_host", Path(host.__file__))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, mm, folder_paths, events


def test_hosted_device_dtypes_and_cancel_are_comfyuis(hosted):
    module, mm, _, _ = hosted
    assert module.is_hosted()
    assert module.unet_dtype(torch.device("cpu")) == torch.bfloat16
    assert module.vae_dtype(torch.device("cpu")) == torch.bfloat16
    assert module.Cancelled is mm.InterruptProcessingException
    module.request_cancel()
    with pytest.raises(mm.InterruptProcessingException):
        module.throw_if_interrupted()


def test_hosted_progress_goes_to_comfyuis_bar_with_previews(hosted):
    module, _, _, events = hosted
    preview = Image.new("RGB", (8, 8))
    with module.ProgressReporter(3) as progress:
        progress.update()
        progress.update(2, preview=preview)
    assert events == [("bar", 3), ("progress", 1, 3, None), ("progress", 3, 3, ("JPEG", preview, 512))]


def test_hosted_model_folders_register_what_comfyui_lacks(hosted, tmp_path):
    module, _, folder_paths, _ = hosted
    touch(tmp_path / "comfy_models" / "ipadapter" / "ip.safetensors")
    assert module.list_model_files("ipadapter") == ["ip.safetensors"]
    assert folder_paths.folder_names_and_paths["ipadapter"][0] == [
        str(tmp_path / "comfy_models" / "ipadapter")
    ]
    assert module.model_file_path("ipadapter", "ip.safetensors").name == "ip.safetensors"
    touch(tmp_path / "comfy_models" / "stray.safetensors")  # in ComfyUI's models/, not in models/loras/
    with pytest.raises(module.ModelFileNotFoundError) as caught:
        module.model_file_path("loras", "stray.safetensors")
    loras = tmp_path / "comfy_models" / "loras"
    assert str(caught.value) == (
        f"loras model 'stray.safetensors' not found in {loras} (no such folder); "
        f"it is at {tmp_path / 'comfy_models' / 'stray.safetensors'}: move it into {loras}"
    )
    assert module.output_directory() == tmp_path / "comfy_output"


def test_hosted_training_configs_find_bare_names_in_comfyuis_models_folder(hosted, tmp_path):
    from foundationals.training import load_config

    module, _, _, _ = hosted
    touch(tmp_path / "comfy_models" / "checkpoints" / "sd15.safetensors")
    config = tmp_path / "train.toml"
    config.write_text(
        '[model]\ncheckpoint = "sd15.safetensors"\n[dataset]\nfolder = "data"\n[output]\nfile = "mine.safetensors"\n'
    )
    loaded = load_config(config, module.model_search_paths)
    assert loaded.model.checkpoint == str(tmp_path / "comfy_models" / "checkpoints" / "sd15.safetensors")
    assert loaded.output.file == str(tmp_path / "comfy_models" / "loras" / "mine.safetensors")
    assert loaded.dataset.folder == str(tmp_path / "data")  # other relative paths: beside the config
