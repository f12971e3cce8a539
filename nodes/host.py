"""The one place that touches ComfyUI: device, dtypes, progress, cancel, folders, memory.

Inside ComfyUI every function delegates to the host (`comfy.model_management`, `comfy.utils`,
`folder_paths`). Without ComfyUI (tests, `python -m nodes run`) each falls back to a standalone
equivalent: a terminal progress bar, a cancel flag, and a `--models-dir` laid out like
ComfyUI's `models/` folder.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
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
    """Storage dtype of the denoiser weights (and of its ControlNets and adapters): the host's choice when hosted,
    fp8 included (`--fp8_e4m3fn-unet`, ...: `model_placement` then computes them in the dtype ComfyUI computes
    fp8 weights in, one layer at a time, as its manual cast does); headless fp16 on GPUs, fp32 on CPU."""
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


PREVIEW_METHODS = ("none", "auto", "latent2rgb", "taesd")
_headless_preview_method = "none"

# Linear maps from SD1.5 / SDXL latents to RGB (ComfyUI's latent_formats), for headless previews
_LATENT_RGB: dict[bool, tuple[tuple[tuple[float, float, float], ...], tuple[float, float, float]]] = {
    False: (
        (
            (0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177),
        ),
        (0.0, 0.0, 0.0),
    ),
    True: (
        (
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        (0.1084, -0.0175, -0.0011),
    ),
}


def set_preview_method(method: str) -> None:
    """Headless: make step previews ("latent2rgb"; "auto" and "taesd" give latent2rgb too; default "none").
    Hosted, ComfyUI's --preview-method decides."""
    global _headless_preview_method
    if method not in PREVIEW_METHODS:
        raise ValueError(f"unknown preview method {method!r}; choose one of {', '.join(PREVIEW_METHODS)}")
    _headless_preview_method = method


def latent_to_rgb(latents: torch.Tensor, sdxl: bool) -> Image.Image:
    """A rough RGB picture of the first (scaled) latent of a batch, without a decoder."""
    factors, bias = _LATENT_RGB[sdxl]
    weight = torch.tensor(factors, dtype=torch.float32, device=latents.device)
    rgb = torch.einsum("chw,cr->hwr", latents[0, :4].float(), weight) + torch.tensor(
        bias, device=latents.device
    )
    array = ((rgb + 1) / 2).clamp(0, 1).mul(255).byte().cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def preview_decoder(sdxl: bool) -> Callable[[torch.Tensor], Image.Image] | None:
    """What turns a step's predicted x0 (scaled latents) into a preview image, or None for no previews.

    Hosted: ComfyUI's own previewer for `--preview-method` (none, auto, latent2rgb, or taesd with its decoder
    from models/vae_approx), as KSampler uses it. Headless: `set_preview_method` (default none).
    """
    if _HOST is None:
        if _headless_preview_method == "none":
            return None
        return lambda latents: latent_to_rgb(latents, sdxl)
    try:
        import latent_preview
        from comfy import latent_formats
    except Exception:  # a host without ComfyUI's preview module
        return None
    latent_format = latent_formats.SDXL() if sdxl else latent_formats.SD15()
    previewer = latent_preview.get_previewer(_HOST[0].get_torch_device(), latent_format)
    if previewer is None:
        return None
    return lambda latents: previewer.decode_latent_to_preview(latents.float())


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
# Memory: every model the pack loads is placed and moved by the host's memory manager
#
# Hosted, each torch module (UNet, text encoders, VAE, ControlNet, T2I-Adapter, IP-Adapter weights, CLIP
# vision) is wrapped in a `comfy.model_patcher.ModelPatcher`, as ComfyUI wraps its own models, and brought
# to its load device by `comfy.model_management.load_models_gpu` before it runs: ComfyUI lists it in
# `current_loaded_models`, frees it for its own models, unloads it on "Unload models" / POST /free and on
# an out-of-memory error, and the next `load_models` brings it back. Headless the same calls move the
# module to its device (nothing to do when it is already there).

MODEL_ROLES = ("unet", "text_encoder", "vae", "controlnet", "adapter", "clip_vision")
"""unet, controlnet and adapter (T2I, IP-Adapter) follow ComfyUI's UNet devices and dtype; text_encoder and
clip_vision its text-encoder ones (as core places its CLIP vision); vae its VAE ones."""

_MIB = 1024 * 1024


@dataclass(frozen=True)
class Placement:
    """Where a model's weights live: on `load_device` while it runs, else on `offload_device`, stored in `dtype`
    and computed in `compute_dtype` (the same unless the device cannot compute in `dtype`: then each layer casts
    its weights for its forward pass, as ComfyUI's manual cast does)."""

    load_device: torch.device
    offload_device: torch.device
    dtype: torch.dtype
    compute_dtype: torch.dtype | None = None

    @property
    def computes_in(self) -> torch.dtype:
        return self.dtype if self.compute_dtype is None else self.compute_dtype


def _native_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`dtype`, or what ComfyUI computes in when the device cannot compute in `dtype` (fp16 on most CPUs)."""
    assert _HOST is not None
    try:
        cast = _HOST[0].unet_manual_cast(dtype, device)
    except Exception:  # an older host without it
        cast = None
    return dtype if cast is None else cast


def text_encoder_dtype(device: torch.device) -> torch.dtype:
    """Storage dtype of text encoders (and of the CLIP vision encoder, as core's): ComfyUI's `text_encoder_dtype`
    when hosted (fp16, or fp8 / bf16 / fp32 by its flags); headless the UNet's."""
    if _HOST is not None:
        return _HOST[0].text_encoder_dtype(device)
    return unet_dtype(device)


def model_placement(role: str) -> Placement:
    """The devices and dtypes of a model playing `role` (see `MODEL_ROLES`)."""
    if role not in MODEL_ROLES:
        raise ValueError(f"unknown model role {role!r}; known: {', '.join(MODEL_ROLES)}")
    if _HOST is None:
        device = get_torch_device()
        dtype = {"vae": vae_dtype, "text_encoder": text_encoder_dtype, "clip_vision": text_encoder_dtype}.get(
            role, unet_dtype
        )(device)
        return Placement(device, device, dtype)
    mm: Any = _HOST[0]
    if role in ("text_encoder", "clip_vision"):
        load = mm.text_encoder_device()
        stored = text_encoder_dtype(load)
        compute = _native_dtype(stored, load)
        return Placement(
            load, mm.text_encoder_offload_device(), stored, None if compute == stored else compute
        )
    if role == "vae":
        load = mm.vae_device()
        return Placement(load, mm.vae_offload_device(), vae_dtype(load))
    load = mm.get_torch_device()
    stored = unet_dtype(load)
    compute = _native_dtype(stored, load)
    return Placement(load, mm.unet_offload_device(), stored, None if compute == stored else compute)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each tensor once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _device_of(module: torch.nn.Module, default: torch.device) -> torch.device:
    tensor = next(iter((*module.parameters(), *module.buffers())), None)
    return default if tensor is None else tensor.device


class _PatcherModel(torch.nn.Module):
    """What a ModelPatcher holds: our module as its one child, plus the plain attributes ComfyUI writes
    (`device`, `model_loaded_weight_memory`, ...) so that none lands on our module."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.fluxion_module = module
        self.device = device


_HOLDER_CLASSES: dict[type, type[_PatcherModel]] = {}


def _holder_class(module_type: type) -> type[_PatcherModel]:
    """A `_PatcherModel` subclass named after the module's class ("FluxionUNet"): ComfyUI's logs name it."""
    holder = _HOLDER_CLASSES.get(module_type)
    if holder is None:
        holder = type(f"Fluxion{module_type.__name__}", (_PatcherModel,), {"__module__": __name__})
        _HOLDER_CLASSES[module_type] = holder
    return holder


_MANAGED_ATTRIBUTE = "_fluxion_managed_model"
_managed_models: weakref.WeakSet[ManagedModel] = weakref.WeakSet()


class ManagedModel:
    """A torch module whose place the host decides: `load_models([...])` brings it to its load device."""

    def __init__(self, module: torch.nn.Module, role: str, placement: Placement, name: str = "") -> None:
        self.module = module
        self.role = role
        self.placement = placement
        self.name = name or type(module).__name__
        self.size = module_bytes(module)
        self.patcher: Any = None
        if placement.compute_dtype is not None and placement.compute_dtype != placement.dtype:
            from ..fluxion.casting import compute_in  # here: this module also loads on its own (tests)

            compute_in(module, placement.compute_dtype)
        if _HOST is not None:
            from comfy.model_patcher import ModelPatcher

            holder = _holder_class(type(module))(module, _device_of(module, placement.offload_device))
            self.patcher = ModelPatcher(
                holder,
                load_device=placement.load_device,
                offload_device=placement.offload_device,
                size=self.size,
            )
        _managed_models.add(self)

    def __repr__(self) -> str:
        return f"ManagedModel({self.name!r}, {self.role}, {self.size / _MIB:.1f} MiB, on {self.device})"

    @property
    def device(self) -> torch.device:
        """Where the weights are now."""
        return _device_of(self.module, self.placement.offload_device)

    def offload(self) -> None:
        """Move the weights to the offload device (what the host does when it unloads the model)."""
        if self.patcher is not None:
            self.patcher.detach()
        else:
            self.module.to(self.placement.offload_device)


def manage(
    module: torch.nn.Module, role: str, placement: Placement | None = None, name: str = ""
) -> ManagedModel:
    """The `ManagedModel` of `module`: the one it already has, else a new one for `role` (placed by
    `model_placement(role)` unless `placement` is given). The module keeps it, so every holder of the module
    (a wire in ComfyUI's output cache, the loader's cache) shares one ModelPatcher and one copy of the weights."""
    existing = module.__dict__.get(_MANAGED_ATTRIBUTE)
    if existing is not None:
        return existing
    managed = ManagedModel(module, role, placement or model_placement(role), name)
    module.__dict__[_MANAGED_ATTRIBUTE] = managed
    return managed


def managed_model(module: torch.nn.Module) -> ManagedModel | None:
    """The `ManagedModel` of a module given to `manage`, else None."""
    return module.__dict__.get(_MANAGED_ATTRIBUTE)


def offload_device(module: torch.nn.Module) -> torch.device:
    """Where the host keeps `module` when it is not running (its managed placement; else the CPU)."""
    managed = managed_model(module)
    return managed.placement.offload_device if managed is not None else torch.device("cpu")


def load_models(
    modules: Iterable[torch.nn.Module], memory_required: float = 0.0, role: str = "adapter"
) -> list[ManagedModel]:
    """Bring `modules` to their load devices together, with `memory_required` bytes free for the work they do.

    Hosted: one `load_models_gpu` call with their ModelPatchers (ComfyUI frees what it must, its own models
    or ours, first). Headless: each module moves to its load device. A module never given to `manage` is
    managed now as `role`.
    """
    models: list[ManagedModel] = []
    for module in modules:
        managed = managed_model(module) or manage(module, role)
        if all(managed is not other for other in models):
            models.append(managed)
    if not models:
        return models
    if _HOST is not None:
        from ..fluxion.casting import set_stream_device  # here: this module also loads on its own (tests)

        _HOST[0].load_models_gpu([model.patcher for model in models], memory_required=memory_required)
        for model in models:  # the layers ComfyUI left on the offload device compute on the load device
            set_stream_device(model.module, model.placement.load_device)
    else:
        for model in models:
            if model.device != model.placement.load_device:
                model.module.to(model.placement.load_device)
    return models


def unload_models() -> None:
    """What "Unload models" does: every loaded model goes to its offload device (ComfyUI's own too, hosted)."""
    if _HOST is not None:
        _HOST[0].unload_all_models()
        return
    for model in list(_managed_models):
        model.offload()


def loaded_model_names() -> list[str]:
    """Names of the pack's models the host has loaded now (hosted: those in `current_loaded_models`)."""
    if _HOST is None:
        return [m.name for m in _managed_models if m.device == m.placement.load_device]
    patchers = {id(model.patcher): model for model in _managed_models}
    loaded = [patchers.get(id(entry.model)) for entry in _HOST[0].current_loaded_models]
    return [model.name for model in loaded if model is not None]


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def sampling_memory(latent_shape: Sequence[int], dtype: torch.dtype, sdxl: bool) -> float:
    """Bytes a UNet pass over `latent_shape` (CFG batch included) needs beyond its weights: ComfyUI's estimate
    for SD1.5 / SDXL (`BaseModel.memory_required`)."""
    area = int(latent_shape[0]) * math.prod(int(side) for side in latent_shape[2:])
    factor = 0.8 if sdxl else 1.0
    flash = False
    if _HOST is not None:
        mm: Any = _HOST[0]
        try:
            flash = bool(mm.xformers_enabled() or mm.pytorch_attention_flash_attention())
        except Exception:
            flash = False
    per_area = _dtype_bytes(dtype) * 0.01 if flash else 0.15
    return area * per_area * factor * _MIB


def vae_memory(latent_shape: Sequence[int], dtype: torch.dtype, decode: bool) -> float:
    """Bytes an SD autoencoder needs to decode `latent_shape` latents (or encode their image): ComfyUI's
    estimate for AutoencoderKL."""
    height, width = int(latent_shape[-2]), int(latent_shape[-1])
    per_pixel = 2178 * 64 if decode else 1767 * 64  # encode: 1767 per image pixel, 64 pixels per latent
    return float(per_pixel * height * width * _dtype_bytes(dtype))
