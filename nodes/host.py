"""The one place that touches ComfyUI: device, dtypes, progress, cancel, folders, memory.

Inside ComfyUI every function delegates to the host (`comfy.model_management`, `comfy.utils`,
`folder_paths`). Without ComfyUI (tests, `python -m nodes run`) each falls back to a standalone
equivalent: a terminal progress bar, a cancel flag, and a `--models-dir` laid out like
ComfyUI's `models/` folder.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import torch
from PIL import Image


def _import_host() -> tuple[ModuleType, ModuleType, ModuleType] | None:
    try:
        import comfy.model_management as model_management
        import comfy.utils as comfy_utils
        import folder_paths
    except Exception:  # absent, or a same-named package that is not ComfyUI
        return None
    return model_management, comfy_utils, folder_paths


_HOST = _import_host()
HOSTED: bool = _HOST is not None
"""True when running inside ComfyUI."""


def is_hosted() -> bool:
    """Whether ComfyUI is the host process."""
    return HOSTED


# ---------------------------------------------------------------------------------------------
# Device and dtypes


def get_torch_device() -> torch.device:
    """The device models run on: ComfyUI's choice when hosted, else CUDA, MPS or CPU."""
    if _HOST is not None:
        return _HOST[0].get_torch_device()
    forced = os.environ.get("FLUXION_DEVICE")
    if forced:
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def unet_dtype(device: torch.device) -> torch.dtype:
    """Dtype for the denoiser weights: host's choice when hosted; fp16 on GPUs, fp32 on CPU."""
    if _HOST is not None:
        supported = [torch.float16, torch.bfloat16, torch.float32]
        try:
            return _HOST[0].unet_dtype(device=device, supported_dtypes=supported)
        except TypeError:  # older ComfyUI signature
            return _HOST[0].unet_dtype(device)
    return torch.float32 if device.type == "cpu" else torch.float16


def vae_dtype(device: torch.device) -> torch.dtype:
    """Dtype for the autoencoder: bf16 where supported (fp16 overflows in SD VAEs), else fp32."""
    if _HOST is not None:
        try:
            return _HOST[0].vae_dtype(device=device, allowed_dtypes=[torch.bfloat16, torch.float32])
        except TypeError:
            return _HOST[0].vae_dtype(device)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


# ---------------------------------------------------------------------------------------------
# Cancel


if _HOST is not None:
    Cancelled: type[Exception] = _HOST[0].InterruptProcessingException
else:

    class Cancelled(Exception):  # type: ignore[no-redef]
        """The user asked to stop: raised by `throw_if_interrupted`."""


_cancel_requested = threading.Event()


def request_cancel() -> None:
    """Ask running work to stop at its next `throw_if_interrupted` (headless; ComfyUI has its own button)."""
    if _HOST is not None:
        _HOST[0].interrupt_current_processing(True)
    else:
        _cancel_requested.set()


def clear_cancel() -> None:
    """Forget a pending cancel request."""
    if _HOST is not None:
        _HOST[0].interrupt_current_processing(False)
    else:
        _cancel_requested.clear()


def throw_if_interrupted() -> None:
    """Raise `Cancelled` (ComfyUI's InterruptProcessingException when hosted) if a stop was requested."""
    if _HOST is not None:
        _HOST[0].throw_exception_if_processing_interrupted()
    elif _cancel_requested.is_set():
        _cancel_requested.clear()  # one request stops one run, as in ComfyUI
        raise Cancelled("processing was cancelled")


# ---------------------------------------------------------------------------------------------
# Progress

_PREVIEW_SIZE = 512


class ProgressReporter:
    """Reports steps of long work: ComfyUI's progress bar (with previews) or a bar on stderr."""

    def __init__(self, total_steps: int, description: str = "", stream: IO[str] | None = None) -> None:
        self.total = max(int(total_steps), 1)
        self.current = 0
        self.description = description
        self._stream = stream
        self._started = time.monotonic()
        self._last_draw = 0.0
        self._closed = False
        self._bar = _HOST[1].ProgressBar(self.total) if _HOST is not None else None

    def update(self, steps: int = 1, preview: Image.Image | None = None) -> None:
        """Advance by `steps`; `preview` is shown on the node when hosted."""
        self.update_absolute(self.current + steps, preview)

    def update_absolute(self, value: int, preview: Image.Image | None = None) -> None:
        """Set progress to `value` of `total`."""
        self.current = min(max(int(value), 0), self.total)
        if self._bar is not None:
            shown = None if preview is None else ("JPEG", preview, _preview_size())
            self._bar.update_absolute(self.current, self.total, shown)
        else:
            self._draw(final=self.current >= self.total)

    def close(self) -> None:
        """Finish the terminal line (headless); idempotent."""
        if self._bar is None and not self._closed:
            self._draw(final=True)
        self._closed = True

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _draw(self, final: bool) -> None:
        if self._closed:
            return
        stream = self._stream if self._stream is not None else sys.stderr
        interactive = getattr(stream, "isatty", lambda: False)()
        now = time.monotonic()
        if not final and (not interactive or now - self._last_draw < 0.1):
            return
        self._last_draw = now
        width = 30
        filled = width * self.current // self.total
        label = f"{self.description} " if self.description else ""
        line = (
            f"{label}[{'#' * filled}{'.' * (width - filled)}] "
            f"{self.current}/{self.total} {now - self._started:.1f}s"
        )
        stream.write(("\r" if interactive else "") + line + ("\n" if final else ""))
        stream.flush()
        if final:
            self._closed = True


def _preview_size() -> int:
    try:
        from comfy.cli_args import args

        return int(args.preview_size)
    except Exception:
        return _PREVIEW_SIZE


# ---------------------------------------------------------------------------------------------
# Model folders

MODEL_EXTENSIONS = frozenset({".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin"})

# kind -> sub-folders of the models directory, as ComfyUI names them (T2I-Adapters share
# "controlnet" with ControlNets; ComfyUI also reads models/t2i_adapter into it).
MODEL_FOLDERS: dict[str, tuple[str, ...]] = {
    "checkpoints": ("checkpoints",),
    "diffusers": ("diffusers",),
    "vae": ("vae",),
    "loras": ("loras",),
    "controlnet": ("controlnet", "t2i_adapter"),
    "clip_vision": ("clip_vision",),
    "ipadapter": ("ipadapter",),
    "embeddings": ("embeddings",),
}


_NAMES_SHOWN = 20


class ModelFileNotFoundError(FileNotFoundError):
    """A model file named in a workflow is not in its folder."""


_models_dir: Path | None = None
_output_dir: Path | None = None
_input_dir: Path | None = None
_temp_dir: Path | None = None


def set_models_dir(path: str | os.PathLike[str]) -> None:
    """Headless: the root holding checkpoints/, loras/, controlnet/, ... (like ComfyUI's models/)."""
    global _models_dir
    _models_dir = Path(path)


def set_output_directory(path: str | os.PathLike[str]) -> None:
    """Headless: where SaveImage writes."""
    global _output_dir
    _output_dir = Path(path)


def set_input_directory(path: str | os.PathLike[str]) -> None:
    """Headless: where LoadImage reads."""
    global _input_dir
    _input_dir = Path(path)


def set_temp_directory(path: str | os.PathLike[str]) -> None:
    """Headless: where PreviewImage writes."""
    global _temp_dir
    _temp_dir = Path(path)


def models_dir() -> Path:
    """Headless models root: set_models_dir(), else $FLUXION_MODELS_DIR, else ./models."""
    if _models_dir is not None:
        return _models_dir
    return Path(os.environ.get("FLUXION_MODELS_DIR", "models"))


def output_directory() -> Path:
    """Where outputs are saved (ComfyUI's output folder when hosted)."""
    if _HOST is not None:
        return Path(_HOST[2].get_output_directory())
    return _output_dir if _output_dir is not None else Path("output")


def input_directory() -> Path:
    """Where input images are read from (ComfyUI's input folder when hosted)."""
    if _HOST is not None:
        return Path(_HOST[2].get_input_directory())
    return _input_dir if _input_dir is not None else Path("input")


def temp_directory() -> Path:
    """Where previews are written (ComfyUI's temp folder when hosted)."""
    if _HOST is not None:
        return Path(_HOST[2].get_temp_directory())
    return _temp_dir if _temp_dir is not None else output_directory() / "temp"


def model_folder_names() -> tuple[str, ...]:
    """The model folder kinds this pack reads."""
    return tuple(MODEL_FOLDERS)


def _check_kind(kind: str) -> None:
    if kind not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder {kind!r}; known: {', '.join(MODEL_FOLDERS)}")


def _register_host_folder(kind: str) -> None:
    """Give ComfyUI's folder_paths a folder it lacks (e.g. "ipadapter"), under its models dir."""
    assert _HOST is not None
    folder_paths = _HOST[2]
    if kind in folder_paths.folder_names_and_paths:
        return
    paths = [os.path.join(folder_paths.models_dir, sub) for sub in MODEL_FOLDERS[kind]]
    folder_paths.folder_names_and_paths[kind] = (paths, set(folder_paths.supported_pt_extensions))


def model_search_paths(kind: str) -> list[Path]:
    """The folders searched for models of `kind`."""
    _check_kind(kind)
    if _HOST is not None:
        _register_host_folder(kind)
        return [Path(p) for p in _HOST[2].get_folder_paths(kind)]
    return [models_dir() / sub for sub in MODEL_FOLDERS[kind]]


def _diffusers_folders(roots: list[Path]) -> list[str]:
    found = set()
    for root in roots:
        if root.is_dir():
            for index in root.rglob("model_index.json"):
                found.add(index.parent.relative_to(root).as_posix())
    return sorted(found)


def list_model_folders(kind: str, is_model: Callable[[Path], bool] | None = None) -> list[str]:
    """Names ('/'-separated, relative) of the model folders under `kind`'s folders: folders holding a diffusers
    `model_index.json`, or those `is_model(folder)` accepts (e.g. a diffusers VAE's config.json)."""
    _check_kind(kind)
    roots = model_search_paths(kind)
    if is_model is None:
        return _diffusers_folders(roots)
    found = set()
    for root in roots:
        if root.is_dir():
            for config in root.rglob("config.json"):
                if is_model(config.parent):
                    found.add(config.parent.relative_to(root).as_posix())
    return sorted(found)


def model_folder_path(kind: str, name: str) -> Path | None:
    """The folder `name` under one of `kind`'s folders, or None."""
    _check_kind(kind)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        return None
    for root in model_search_paths(kind):
        if (root / relative).is_dir():
            return root / relative
    return None


class ModelFileNames(list[str]):
    """The names `list_model_files` gives, remembering their folder kind (so a missing name's error can name
    the folders searched); a plain list to everything else (ComfyUI's COMBO, JSON)."""

    def __init__(self, kind: str, names: Iterable[str] = ()) -> None:
        super().__init__(names)
        self.kind = kind


def list_model_files(kind: str) -> ModelFileNames:
    """Names (relative paths, '/'-separated) of the model files of `kind`, sorted."""
    _check_kind(kind)
    if kind == "diffusers":  # diffusers models are folders holding model_index.json
        return ModelFileNames(kind, _diffusers_folders(model_search_paths(kind)))
    if _HOST is not None:
        _register_host_folder(kind)
        return ModelFileNames(kind, _HOST[2].get_filename_list(kind))
    found = set()
    for root in model_search_paths(kind):
        if root.is_dir():
            for path in root.rglob("*"):
                if path.suffix.lower() in MODEL_EXTENSIONS and path.is_file():
                    found.add(path.relative_to(root).as_posix())
    return ModelFileNames(kind, sorted(found))


def models_root() -> Path:
    """The folder holding all model folders: ComfyUI's models/ when hosted, else `models_dir()`."""
    return Path(_HOST[2].models_dir) if _HOST is not None else models_dir()


def missing_model_message(kind: str, name: str) -> str:
    """Why model `name` of `kind` is not found: the folders searched, and where the file is if it lies elsewhere
    under the models folder (else what the folders do hold)."""
    folders = model_search_paths(kind)
    searched = ", ".join(str(p) if p.is_dir() else f"{p} (no such folder)" for p in folders)
    text = f"{kind} model {name!r} not found in {searched}"
    root, wanted = models_root(), Path(name).name
    elsewhere = sorted(p for p in root.rglob("*") if p.name == wanted)[:3] if root.is_dir() else []
    if elsewhere:
        places = " and ".join(str(p) for p in elsewhere)
        return f"{text}; it is at {places}: move it into {folders[0]}"
    available = list_model_files(kind)
    if not available:
        return f"{text}: no {kind} files there" if any(p.is_dir() for p in folders) else text
    shown = ", ".join(available[:_NAMES_SHOWN]) + (
        f" and {len(available) - _NAMES_SHOWN} more" if len(available) > _NAMES_SHOWN else ""
    )
    return f"{text}; available {kind}: {shown}"


def model_file_path(kind: str, name: str) -> Path:
    """Full path of model `name` of `kind`; the error lists the files that do exist."""
    _check_kind(kind)
    relative = Path(name)
    if relative.is_absolute() or ".." in relative.parts:
        raise ModelFileNotFoundError(f"model name {name!r} must be a path inside the {kind!r} folder")
    if _HOST is not None and kind != "diffusers":
        _register_host_folder(kind)
        full = _HOST[2].get_full_path(kind, name)
        if full is not None:
            return Path(full)
    else:
        for root in model_search_paths(kind):
            candidate = root / relative
            found = candidate.is_dir() if kind == "diffusers" else candidate.is_file()
            if found:
                return candidate
    raise ModelFileNotFoundError(missing_model_message(kind, name))


# ---------------------------------------------------------------------------------------------
# Memory

_release_callbacks: list[Callable[[], None]] = []
_host_hooked = False


def register_memory_release(callback: Callable[[], None]) -> Callable[[], None]:
    """Call `callback` whenever the host frees model memory; returns it (usable as a decorator).

    ComfyUI has no hook for this, so when hosted we wrap `comfy.model_management.unload_all_models`
    (the "Unload models" button and POST /free) and `free_memory` (called before ComfyUI loads a
    model): our callbacks run on every unload-all, and on `free_memory` when ComfyUI's own unloading
    left less free memory than was asked for. Headless, `release_memory()` runs them.
    """
    if callback not in _release_callbacks:
        _release_callbacks.append(callback)
    if _HOST is not None:
        _hook_host_memory()
    return callback


def release_memory() -> None:
    """Run every registered release callback (what the host does under memory pressure)."""
    for callback in list(_release_callbacks):
        callback()


def _hook_host_memory() -> None:
    global _host_hooked
    if _host_hooked or _HOST is None:
        return
    model_management: Any = _HOST[0]
    original_unload_all = model_management.unload_all_models
    original_free = model_management.free_memory

    def unload_all_models(*args: Any, **kwargs: Any) -> Any:
        result = original_unload_all(*args, **kwargs)
        release_memory()
        return result

    def free_memory(memory_required: float, device: torch.device, *args: Any, **kwargs: Any) -> Any:
        result = original_free(memory_required, device, *args, **kwargs)
        try:
            short = model_management.get_free_memory(device) < memory_required
        except Exception:
            short = False
        if short:
            release_memory()
            model_management.soft_empty_cache()
        return result

    model_management.unload_all_models = unload_all_models
    model_management.free_memory = free_memory
    _host_hooked = True
