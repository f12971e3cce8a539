"""One strict reader for every model file the pack opens: safetensors (memory-mapped) and weights-only pickles.

Every failure is a `ModelFileError` naming the file, what was found and what was expected; no raw
safetensors/Rust error, `UnicodeDecodeError` or unpickling error escapes. A safetensors header is fully
validated (JSON object, dtypes, shapes, `data_offsets` against dtype x shape byte counts, contiguous
and covering the file exactly) before any tensor is touched. Pickles (`.ckpt/.pt/.pth/.bin`) go only
through `torch.load(weights_only=True)`, so a file that would run code is refused without running it.

Low-precision policy (the same for every format):
- fp8 (`float8_e4m3fn`, `float8_e5m2`) is a storage format: such tensors are upcast to the requested
  `dtype`, or to float16 when none is requested (every fp8 value is exact in fp16), and the upcast is
  logged at INFO. Files that carry fp8 scales (`scale_weight`, `weight_scale`, `scaled_fp8`, ...) hold
  *scaled* quantized weights that a plain upcast would get wrong: they are refused.
- int8/uint8 tensors named `*weight` are quantized weights (bitsandbytes, int8 exports): refused with
  "quantized weights (int8) are not supported". Other integer tensors (position ids, step counters)
  are returned unchanged, as are all integer and bool tensors when `dtype` is given.
"""

from __future__ import annotations

import difflib
import io
import json
import logging
import math
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
MODEL_FILE_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces; real headers are at most a few MB
CONTAINER_KEYS = ("state_dict", "model")  # Lightning / training checkpoints wrap the weights in one of these

# safetensors dtype name -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "BOOL": (torch.bool, 1),
    "U8": (torch.uint8, 1),
    "I8": (torch.int8, 1),
    "F8_E5M2": (torch.float8_e5m2, 1),
    "F8_E4M3": (torch.float8_e4m3fn, 1),
    "I16": (torch.int16, 2),
    "U16": (torch.uint16, 2),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I32": (torch.int32, 4),
    "U32": (torch.uint32, 4),
    "F32": (torch.float32, 4),
    "F64": (torch.float64, 8),
    "I64": (torch.int64, 8),
    "U64": (torch.uint64, 8),
}
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
INT8_DTYPES = (torch.int8, torch.uint8)
FP8_SCALE_MARKERS = re.compile(r"(^|[._])(scale_weight|weight_scale|scale_input|input_scale|scaled_fp8)$")
FP8_UPCAST_DEFAULT = torch.float16

logger = logging.getLogger(__name__)


class ModelFileError(ValueError):
    """A model file that cannot be used: the message names the file, what was found and what was expected."""

    def __init__(self, path: str | Path, what: str, found: str, expected: str) -> None:
        self.path, self.what, self.found, self.expected = Path(path), what, found, expected
        super().__init__(f"{what} file '{path}': {found}; expected {expected}")

    def __reduce__(self) -> tuple[type[ModelFileError], tuple[Path, str, str, str]]:
        return type(self), (self.path, self.what, self.found, self.expected)


class TensorSpec(NamedTuple):
    """A tensor's dtype and shape as declared by its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]


class _Entry(NamedTuple):
    """One validated safetensors header entry."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


# --- public API ------------------------------------------------------------------------------------------


def read_state_dict(
    path: str | Path,
    *,
    what: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    keys: Iterable[str] | None = None,
) -> dict[str, Tensor]:
    """All tensors (or only `keys`) of a model file on `device`, floating ones converted to `dtype`."""
    path = _check_file(path, what)
    wanted = list(dict.fromkeys([keys] if isinstance(keys, str) else keys)) if keys is not None else None
    if _is_safetensors(path):
        return _read_safetensors(path, what, device, dtype, wanted)
    tensors = _read_pickle(path, what)
    names = wanted if wanted is not None else list(tensors)
    _check_keys_present(path, what, names, tensors)
    _check_dtype_policy(
        path, what, {key: TensorSpec(t.dtype, tuple(t.shape)) for key, t in tensors.items()}, names
    )
    return _convert(path, what, ((key, tensors[key]) for key in names), device, dtype)


def read_metadata(path: str | Path, *, what: str = "model") -> dict[str, str]:
    """The `__metadata__` strings of a safetensors file, from its header only (`{}` for pickle formats)."""
    path = _check_file(path, what)
    if not _is_safetensors(path):
        return {}
    return _parse_safetensors_header(path, what)[1]


def read_header(path: str | Path, *, what: str = "model") -> dict[str, TensorSpec]:
    """Every tensor's (dtype, shape) in file order: safetensors from the header alone, pickles memory-mapped."""
    path = _check_file(path, what)
    if _is_safetensors(path):
        entries = _parse_safetensors_header(path, what)[0]
        return {entry.name: TensorSpec(entry.dtype, entry.shape) for entry in entries}
    return {
        key: TensorSpec(tensor.dtype, tuple(tensor.shape)) for key, tensor in _read_pickle(path, what).items()
    }


def list_keys(path: str | Path, *, what: str = "model") -> list[str]:
    """The tensor names of a model file in file order (header only for safetensors)."""
    return list(read_header(path, what=what))


def describe_keys(keys: Iterable[str], limit: int = 6) -> str:
    """One line summarising a key set by its top prefixes, e.g. "1130 keys: model.diffusion_model.* (686), ..."."""
    keys = list(keys)
    heads: dict[str, list[str]] = {}
    for key in keys:
        heads.setdefault(key.split(".", 1)[0], []).append(key)
    if len(heads) > 2 * limit:  # kohya-style flat names (lora_unet_down_blocks_0_...): group by two words
        regrouped: dict[str, list[str]] = {}
        for head, members in heads.items():
            words = head.split("_")
            label = "_".join(words[:2]) + "_" if len(words) > 2 else head
            regrouped.setdefault(label, []).extend(members)
        heads = regrouped
    groups = sorted(
        ((_group_label(head, members), len(members)) for head, members in heads.items()), key=lambda g: -g[1]
    )
    shown = ", ".join(f"{label} ({count})" for label, count in groups[:limit])
    more = f", ... ({len(groups) - limit} more prefixes)" if len(groups) > limit else ""
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}" + (f": {shown}{more}" if keys else "")


# --- checks shared by every format ------------------------------------------------------------------------


def _check_file(path: str | Path, what: str) -> Path:
    """The path, once it is known to be a readable, non-empty file with a supported suffix."""
    path = Path(path)
    expected_file = f"a single {what} file ({', '.join(MODEL_FILE_SUFFIXES)})"
    if not path.exists():
        raise ModelFileError(path, what, _describe_missing(path), expected_file)
    if path.is_dir():
        raise ModelFileError(path, what, _describe_folder(path), expected_file)
    if path.suffix.lower() not in MODEL_FILE_SUFFIXES:
        raise ModelFileError(
            path,
            what,
            f"unsupported suffix '{path.suffix or '(none)'}'",
            f"one of {', '.join(MODEL_FILE_SUFFIXES)}",
        )
    try:
        size = path.stat().st_size
        with path.open("rb"):
            pass
    except OSError as error:
        raise ModelFileError(
            path, what, f"cannot be opened ({error.strerror or error})", "a readable file"
        ) from error
    if size == 0:
        raise ModelFileError(
            path, what, "the file is empty (0 bytes; an interrupted download or copy?)", expected_file
        )
    return path


def _describe_missing(path: Path) -> str:
    """Why a path does not exist, with the model files that do exist beside it."""
    if path.is_symlink():
        return f"it is a broken link to '{path.readlink()}'"
    folder = path.parent
    if not folder.is_dir():
        return f"no such file, and its folder '{folder}' does not exist either"
    siblings = [p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MODEL_FILE_SUFFIXES]
    if not siblings:
        return f"no such file, and its folder holds no model files ({', '.join(MODEL_FILE_SUFFIXES)})"
    close = difflib.get_close_matches(path.name, siblings, n=len(siblings), cutoff=0.0)
    more = f" and {len(close) - 8} more" if len(close) > 8 else ""
    return f"no such file; that folder holds {', '.join(close[:8])}{more}"


def _describe_folder(path: Path) -> str:
    """What a folder given in place of a file looks like."""
    markers = [name for name in ("model_index.json", "unet/") if (path / name).exists()]
    if markers:
        return f"it is a diffusers folder (it has {' and '.join(markers)}), not a single file"
    files = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix.lower() in MODEL_FILE_SUFFIXES)
    inside = f" holding {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}" if files else ""
    return f"it is a folder{inside}, not a file"


def _is_safetensors(path: Path) -> bool:
    """Whether a checked path is read as safetensors (by suffix)."""
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _sniff(head: bytes) -> str | None:
    """What the first bytes of a file say it is, when that is recognisable."""
    stripped = head.lstrip().lower()
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (a few lines of text), not the model data: the download fetched the pointer"
    if stripped.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return "an HTML/XML page (a failed or login-gated download?)"
    if head.startswith(b"GGUF"):
        return "a GGUF file (llama.cpp-style quantized weights), which this pack does not read"
    if head.startswith(b"PK\x03\x04"):
        return "a PyTorch zip checkpoint (.ckpt/.pt)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (legacy .ckpt/.pt)"
    if len(head) >= 9 and int.from_bytes(head[:8], "little") < MAX_HEADER_BYTES and head[8:9] == b"{":
        return "safetensors data"
    return None


def _check_keys_present(path: Path, what: str, wanted: list[str], available: Iterable[str]) -> None:
    """Refuse a request for tensors the file does not hold."""
    available = list(available)
    present = set(available)
    missing = [key for key in wanted if key not in present]
    if missing:
        names = ", ".join(f"'{key}'" for key in missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelFileError(
            path, what, f"has no tensor {names}", f"them among its {describe_keys(available)}"
        )


def _check_dtype_policy(path: Path, what: str, specs: dict[str, TensorSpec], wanted: list[str]) -> None:
    """Refuse quantized weights (int8/uint8 weights, scaled fp8) among the requested tensors."""
    for key in wanted:
        spec = specs[key]
        if spec.dtype in INT8_DTYPES and key.endswith("weight"):
            kind = str(spec.dtype).removeprefix("torch.")
            raise ModelFileError(
                path,
                what,
                f"quantized weights ({kind}) are not supported: tensor '{key}' is {kind} {list(spec.shape)}",
                "floating-point weights (fp32, fp16, bf16, or fp8 which is upcast)",
            )
    if any(specs[key].dtype in FP8_DTYPES for key in wanted):
        scales = [key for key in specs if FP8_SCALE_MARKERS.search(key)]
        if scales:
            raise ModelFileError(
                path,
                what,
                f"scaled fp8 quantized weights are not supported (scale tensors such as '{scales[0]}')",
                "unscaled fp8, fp16, bf16 or fp32 weights",
            )


def _convert(
    path: Path,
    what: str,
    tensors: Iterable[tuple[str, Tensor]],
    device: torch.device | str,
    dtype: torch.dtype | None,
) -> dict[str, Tensor]:
    """Tensors moved to `device`, floating ones cast to `dtype`, fp8 ones always upcast (see module docstring)."""
    result: dict[str, Tensor] = {}
    upcast: dict[torch.dtype, int] = {}
    for key, tensor in tensors:
        target = dtype if tensor.is_floating_point() else None
        if tensor.dtype in FP8_DTYPES:
            target = dtype or FP8_UPCAST_DEFAULT
            upcast[tensor.dtype] = upcast.get(tensor.dtype, 0) + 1
        result[key] = tensor.to(device=device, dtype=target)
    if upcast:
        counts = ", ".join(f"{count} {str(kind).removeprefix('torch.')}" for kind, count in upcast.items())
        target_name = str(dtype or FP8_UPCAST_DEFAULT).removeprefix("torch.")
        logger.info("%s file '%s': upcast %s tensors to %s", what, path, counts, target_name)
    return result


# --- safetensors ------------------------------------------------------------------------------------------


def _parse_safetensors_header(path: Path, what: str) -> tuple[list[_Entry], dict[str, str]]:
    """The validated tensor entries (in data order) and metadata of a safetensors file, reading only its header."""
    expected = "a safetensors file (8-byte little-endian header length, a JSON header, then the tensor data)"
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            head = file.read(64)
            if size < 8:
                raise ModelFileError(
                    path, what, f"the file is only {size} bytes, too short for a header length", expected
                )
            length = int.from_bytes(head[:8], "little")
            hint = _sniff(head)
            hint = f" (it looks like {hint})" if hint and hint != "safetensors data" else ""
            if length > MAX_HEADER_BYTES:
                found = f"its header length field says {length:,} bytes, over the {MAX_HEADER_BYTES:,}-byte limit{hint}"
                raise ModelFileError(path, what, found, expected)
            if 8 + length > size:
                found = f"its header length field says {length:,} bytes but only {size - 8:,} follow (truncated?){hint}"
                raise ModelFileError(path, what, found, expected)
            file.seek(8)
            raw = file.read(length)
    except OSError as error:
        raise ModelFileError(path, what, f"cannot be read ({error.strerror or error})", expected) from error
    return _validate_header(path, what, raw, size - 8 - length)


def _validate_header(
    path: Path, what: str, raw: bytes, data_size: int
) -> tuple[list[_Entry], dict[str, str]]:
    """Check a raw header against the safetensors format and the size of the data that follows it."""
    expected = "a JSON object mapping tensor names to {dtype, shape, data_offsets}"

    def refuse(found: str, wanted: str = expected) -> ModelFileError:
        return ModelFileError(path, what, found, wanted)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise refuse(
            f"its header is not UTF-8 text (byte {error.start} is 0x{raw[error.start]:02x})"
        ) from None
    try:
        header = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as error:
        raise refuse(f"its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise refuse(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise refuse("its __metadata__ is not a mapping of strings to strings", "string-to-string metadata")

    entries: list[_Entry] = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise refuse(f"tensor '{name}' has entry {_clip(repr(info))}")
        kind, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(kind, str) or kind not in SAFETENSORS_DTYPES:
            raise refuse(
                f"tensor '{name}' has unsupported dtype {_clip(repr(kind))}",
                f"one of {', '.join(SAFETENSORS_DTYPES)}",
            )
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise refuse(f"tensor '{name}' has shape {_clip(repr(shape))}", "a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_size(o) for o in offsets):
            raise refuse(
                f"tensor '{name}' has data_offsets {_clip(repr(offsets))}", "[begin, end] byte offsets"
            )
        torch_dtype, itemsize = SAFETENSORS_DTYPES[kind]
        begin, end = offsets
        nbytes = math.prod(shape) * itemsize
        if end - begin != nbytes:
            raise refuse(
                f"tensor '{name}' is {kind} {shape} ({nbytes:,} bytes) but its data_offsets {offsets} span {end - begin:,}",
                "data_offsets matching dtype x shape",
            )
        entries.append(_Entry(name, torch_dtype, tuple(shape), begin, end))

    entries.sort(key=lambda entry: (entry.begin, entry.end))
    last = max(entries, key=lambda entry: entry.end, default=None)
    if last is not None and last.end > data_size:
        raise refuse(
            f"tensor '{last.name}' ends at byte {last.end:,} of the data but the file holds only {data_size:,} (truncated?)",
            "the whole file",
        )
    position, previous = 0, None
    for entry in entries:
        if entry.begin < position:
            raise refuse(
                f"tensors '{previous}' and '{entry.name}' overlap at byte {entry.begin:,}", "disjoint tensors"
            )
        if entry.begin > position:
            raise refuse(
                f"{entry.begin - position:,} unclaimed bytes before tensor '{entry.name}'",
                "contiguous tensors",
            )
        position, previous = entry.end, entry.name
    if position != data_size:
        raise refuse(
            f"{data_size - position:,} bytes follow the last tensor", "the data to end with the last tensor"
        )
    return entries, metadata


def _read_safetensors(
    path: Path, what: str, device: torch.device | str, dtype: torch.dtype | None, wanted: list[str] | None
) -> dict[str, Tensor]:
    """Validated, memory-mapped read of the requested tensors through `safetensors.safe_open`."""
    entries, _ = _parse_safetensors_header(path, what)
    specs = {entry.name: TensorSpec(entry.dtype, entry.shape) for entry in entries}
    names = wanted if wanted is not None else list(specs)
    _check_keys_present(path, what, names, specs)
    _check_dtype_policy(path, what, specs, names)

    def tensors() -> Iterator[tuple[str, Tensor]]:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            for name in names:
                tensor = file.get_tensor(name)
                if tensor.dtype != specs[name].dtype or tuple(tensor.shape) != specs[name].shape:
                    found = f"tensor '{name}' read as {tensor.dtype} {list(tensor.shape)}, header says {specs[name]}"
                    raise ModelFileError(path, what, found, "the tensor its header declares")
                yield name, tensor

    try:
        return _convert(path, what, tensors(), device, dtype)
    except ModelFileError:
        raise
    except BaseException as error:  # pyo3's PanicException derives from BaseException
        if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
            raise
        found = f"safetensors could not read it ({type(error).__name__}: {_clip(str(error), 300)})"
        raise ModelFileError(path, what, found, "a valid safetensors file") from error


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object hook that refuses duplicate names."""
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"name '{key}' appears twice")
        result[key] = value
    return result


def _reject_constant(name: str) -> float:
    """A JSON hook that refuses NaN/Infinity, which are not JSON."""
    raise ValueError(f"{name} is not a JSON value")


def _is_size(value: object) -> bool:
    """Whether a header value is a plausible byte count or dimension (a non-negative int, not a bool)."""
    return type(value) is int and 0 <= value < 2**63


def _clip(text: str, limit: int = 80) -> str:
    """A text shortened for an error message."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- pickles (torch.load, weights only) -------------------------------------------------------------------


def _read_pickle(path: Path, what: str) -> dict[str, Tensor]:
    """The tensors of a `.ckpt/.pt/.pth/.bin` file, unpickled with `weights_only=True` and flattened."""
    expected = "a PyTorch checkpoint holding a state dict of tensors"
    with path.open("rb") as file:
        head = file.read(64)
    kind = _sniff(head)
    if kind is not None and not kind.startswith(("a PyTorch zip", "a Python pickle")):
        advice = "; rename it to .safetensors" if kind == "safetensors data" else ""
        raise ModelFileError(path, what, f"it holds {kind}{advice}", expected)
    is_zip = head.startswith(b"PK\x03\x04")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols and storages are noise here
            content = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as error:
        culprits = _pickle_globals(path, is_zip)
        if culprits:
            found = (
                f"refused to unpickle it: it would import {', '.join(culprits[:3])}"
                " (loading it unrestricted could run code from the file; nothing was run)"
            )
        else:
            found = f"weights-only unpickling refused it ({_torch_reason(error)}): corrupt, or holds non-tensor objects"
        raise ModelFileError(path, what, found, f"{expected} only (prefer a .safetensors copy)") from None
    except Exception as error:
        found = f"torch.load could not read it ({type(error).__name__}: {_torch_reason(error)}; truncated or corrupt?)"
        raise ModelFileError(path, what, found, expected) from None
    return _flatten_checkpoint(path, what, content)


def _flatten_checkpoint(path: Path, what: str, content: object) -> dict[str, Tensor]:
    """Unwrap `state_dict`/`model` containers, then flatten nested dicts to dotted names; drop non-tensors."""
    expected = "a dict of tensors (optionally under 'state_dict' or 'model')"
    while isinstance(content, dict):
        inner = next((content[k] for k in CONTAINER_KEYS if isinstance(content.get(k), dict)), None)
        if inner is None:
            break
        content = inner
    if not isinstance(content, dict):
        raise ModelFileError(path, what, f"it holds a {type(content).__name__}", expected)
    tensors: dict[str, Tensor] = {}

    def collect(prefix: str, value: object) -> None:
        if isinstance(value, Tensor):
            if value.is_quantized:
                found = f"quantized weights ({value.dtype}) are not supported: tensor '{prefix}'"
                raise ModelFileError(path, what, found, "floating-point weights")
            tensors[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                collect(f"{prefix}.{key}" if prefix else str(key), item)

    collect("", content)
    if not tensors:
        raise ModelFileError(
            path, what, f"it holds no tensors (top-level entries: {_clip(repr(list(content)[:8]))})", expected
        )
    return tensors


def _torch_reason(error: BaseException) -> str:
    """The informative line of a (long, multi-paragraph) torch.load error, without its allowlisting advice."""
    text = str(error).split("WeightsUnpickler error:", 1)[-1]
    line = next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    return _clip(line.split(" Please use `torch.serialization")[0], 300)


def _pickle_globals(path: Path, is_zip: bool) -> list[str]:
    """Non-torch globals a pickle references, found by walking its opcodes without executing anything."""
    found: list[str] = []
    try:
        if is_zip:
            with zipfile.ZipFile(path) as archive:
                member = next(name for name in archive.namelist() if name.endswith("data.pkl"))
                _scan_globals(io.BytesIO(archive.read(member)), found)
        else:
            with path.open("rb") as file:
                for _ in range(4):  # legacy torch.save: magic, protocol, sys info, then the object itself
                    _scan_globals(file, found)
    except Exception:
        pass  # past the end, or a damaged pickle: report what was found up to there
    safe = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set")
    return list(dict.fromkeys(name for name in found if not name.startswith(safe)))


def _scan_globals(stream: IO[bytes], found: list[str]) -> None:
    """Append the `module.name` of every global one pickle (up to its STOP) imports."""
    memo: dict[int, object] = {}
    pushed: list[object] = []  # what each opcode pushed, as far as STACK_GLOBAL needs to know
    for opcode, arg, _ in pickletools.genops(stream):
        if opcode.name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif opcode.name == "STACK_GLOBAL" and len(pushed) >= 2:
            found.append(f"{pushed[-2]}.{pushed[-1]}")
        if opcode.name == "MEMOIZE" and pushed:
            memo[len(memo)] = pushed[-1]
        elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT") and pushed:
            memo[int(str(arg))] = pushed[-1]
        elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(int(str(arg))))
        elif opcode.name not in ("FRAME", "PROTO"):
            pushed.append(arg if isinstance(arg, str) and "UNICODE" in opcode.name else None)


def _group_label(head: str, members: list[str]) -> str:
    """The longest dotted prefix shared by a group of keys, as "prefix.*" (or the key itself if alone)."""
    if len(members) == 1:
        return members[0]
    if head.endswith("_"):
        return head + "*"
    parts = [key.split(".") for key in members]
    depth = 1
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    return ".".join(parts[0][:depth]) + ".*"


def describe_model_kind(keys: Sequence[str]) -> str:
    """What a file that is not the expected adapter looks like, from its keys."""

    def has(*fragments: str) -> bool:
        return any(fragment in key for key in keys for fragment in fragments)

    if has("lora_down", "lora_up", ".lora.", "lora_A", "lora_B", "hada_w", "lokr_w") or any(
        key.startswith("lora_") for key in keys
    ):
        return "a LoRA"
    if has("input_hint_block", "controlnet_cond_embedding"):
        return "a ControlNet"
    if has("adapter.body.", "body.0.") and has("conv_in.weight", "in_conv", "block1"):
        return "a T2I-Adapter"
    if has("ip_adapter", "image_proj."):
        return "an IP-Adapter"
    if any(key.startswith("model.diffusion_model.") for key in keys):
        return "a Stable Diffusion checkpoint"
    if has("up_blocks.") and has("down_blocks."):
        return "a diffusers UNet or autoencoder"
    return "an unknown model"
