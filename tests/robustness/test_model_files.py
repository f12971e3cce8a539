"""The strict model-file reader: valid files round-trip, every broken or hostile file gets a clear ModelFileError."""

import json
import logging
import os
import pathlib
import pickle

import pytest
import torch
from safetensors.torch import save_file

from foundationals import model_files
from foundationals.model_files import (
    ModelFileError,
    TensorSpec,
    describe_keys,
    list_keys,
    read_header,
    read_metadata,
    read_state_dict,
)

# --- helpers ----------------------------------------------------------------------------------------------


def write_raw_safetensors(path, header, data=b"", length=None):
    """A safetensors-shaped file written byte by byte (header: a dict to JSON-encode, or raw bytes)."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = (len(raw) if length is None else length).to_bytes(8, "little")
    path.write_bytes(prefix + raw + data)
    return path


def refused(path, *fragments, what="SD checkpoint", **kwargs):
    """Read a file expecting a ModelFileError that names it, says what was expected and holds `fragments`."""
    with pytest.raises(ModelFileError) as caught:
        read_state_dict(path, what=what, **kwargs)
    message = str(caught.value)
    assert str(path) in message and f"{what} file" in message and "expected" in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def tensors():
    return {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.float16),
        "ids": torch.arange(7).unsqueeze(0),
    }


@pytest.fixture
def valid_file(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "ss_network_dim": "4"})
    return path


def tensor_entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# --- valid files ------------------------------------------------------------------------------------------


def test_safetensors_round_trips_exactly(valid_file, tensors):
    loaded = read_state_dict(valid_file, what="SD checkpoint")
    assert (
        list(loaded) == list_keys(valid_file) == ["ids", "a", "b"]
    )  # data order: the writer puts 8-byte ints first
    for key, tensor in tensors.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor)


def test_safetensors_dtype_conversion_and_key_subset(valid_file, tensors):
    loaded = read_state_dict(valid_file, what="SD checkpoint", dtype=torch.bfloat16, keys=["ids", "a"])
    assert list(loaded) == ["ids", "a"]
    assert loaded["a"].dtype == torch.bfloat16 and torch.equal(loaded["a"], tensors["a"].to(torch.bfloat16))
    assert loaded["ids"].dtype == torch.int64 and torch.equal(
        loaded["ids"], tensors["ids"]
    )  # integers keep theirs


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_precision_files_load_as_fp32_when_asked(tmp_path, stored):
    original = torch.randn(4, 6).to(stored)
    for path in (tmp_path / "half.safetensors", tmp_path / "half.pt"):
        save_file({"w": original}, str(path)) if path.suffix == ".safetensors" else torch.save(
            {"w": original}, path
        )
        loaded = read_state_dict(path, what="LoRA", dtype=torch.float32)["w"]
        assert loaded.dtype == torch.float32 and torch.equal(loaded, original.float())


def test_header_metadata_and_keys_without_reading_tensor_data(tmp_path, monkeypatch):
    big = 64 * 1024 * 1024 * 4  # a 256 MiB tensor, stored sparse: only the header is ever read
    header = {
        "__metadata__": {"modelspec.architecture": "stable-diffusion-v1"},
        "big": tensor_entry("F32", [64, 1024, 1024], 0, big),
        "small": tensor_entry("F16", [2], big, big + 4),
    }
    path = write_raw_safetensors(tmp_path / "sparse.safetensors", header)
    with path.open("r+b") as file:
        file.truncate(path.stat().st_size + big + 4)
    monkeypatch.setattr(model_files, "safe_open", None)  # header readers must not open tensor data at all
    assert read_header(path) == {
        "big": TensorSpec(torch.float32, (64, 1024, 1024)),
        "small": TensorSpec(torch.float16, (2,)),
    }
    assert list_keys(path) == ["big", "small"]
    assert read_metadata(path) == {"modelspec.architecture": "stable-diffusion-v1"}
    monkeypatch.undo()
    assert read_state_dict(path, what="SD checkpoint", keys=["small"])["small"].tolist() == [0.0, 0.0]


def test_pickle_formats_unwrap_containers_and_flatten_nesting(tmp_path, tensors):
    torch.save({"state_dict": tensors, "global_step": 10, "epoch": 2}, tmp_path / "lightning.ckpt")
    torch.save({"model": tensors}, tmp_path / "wrapped.pth")
    torch.save(tensors, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("lightning.ckpt", "wrapped.pth", "legacy.pt"):
        loaded = read_state_dict(
            tmp_path / name, what="SD checkpoint", dtype=torch.float32, keys=["a", "ids"]
        )
        assert list(loaded) == ["a", "ids"] and torch.equal(loaded["a"], tensors["a"])
        assert loaded["ids"].dtype == torch.int64
    ip_adapter = {
        "image_proj": {"proj.weight": torch.ones(2, 2)},
        "ip_adapter": {"1.to_k_ip.weight": torch.ones(3)},
    }
    torch.save(ip_adapter, tmp_path / "ip-adapter_sd15.bin")
    assert list_keys(tmp_path / "ip-adapter_sd15.bin") == [
        "image_proj.proj.weight",
        "ip_adapter.1.to_k_ip.weight",
    ]
    assert read_metadata(tmp_path / "ip-adapter_sd15.bin") == {}


# --- low-precision policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_is_upcast_to_the_requested_dtype_with_a_note(tmp_path, fp8, caplog):
    stored = torch.randn(8, 8).to(fp8)
    path = tmp_path / "fp8.safetensors"
    save_file({"w": stored, "vae.bias": torch.ones(2, dtype=torch.float16)}, str(path))
    with caplog.at_level(logging.INFO, logger=model_files.__name__):
        loaded = read_state_dict(path, what="SD checkpoint", dtype=torch.float32)
    assert loaded["w"].dtype == torch.float32 and torch.equal(loaded["w"], stored.float())
    assert f"upcast 1 {str(fp8).removeprefix('torch.')} tensors to float32" in caplog.text
    default = read_state_dict(
        path, what="SD checkpoint"
    )  # no dtype asked: fp8 -> fp16 (exact), others as stored
    assert default["w"].dtype == torch.float16 and torch.equal(default["w"].float(), stored.float())
    assert default["vae.bias"].dtype == torch.float16


def test_scaled_fp8_is_refused(tmp_path):
    path = tmp_path / "scaled.safetensors"
    weights = {"layer.weight": torch.ones(4, 4).to(torch.float8_e4m3fn), "layer.scale_weight": torch.ones(1)}
    save_file(weights, str(path))
    refused(path, "scaled fp8 quantized weights are not supported", "layer.scale_weight")


@pytest.mark.parametrize("kind", [torch.int8, torch.uint8])
def test_int8_weights_are_refused_other_integers_pass(tmp_path, kind):
    quantized = {"layer.weight": torch.ones(4, 4, dtype=kind), "counter": torch.ones(2, dtype=kind)}
    name = str(kind).removeprefix("torch.")
    for path in (tmp_path / "q.safetensors", tmp_path / "q.ckpt"):
        save_file(quantized, str(path)) if path.suffix == ".safetensors" else torch.save(quantized, path)
        refused(path, f"quantized weights ({name}) are not supported", "layer.weight", dtype=torch.float32)
        counter = read_state_dict(path, what="SD checkpoint", dtype=torch.float32, keys=["counter"])[
            "counter"
        ]
        assert counter.dtype == kind


# --- files that are not there or not files ----------------------------------------------------------------


def test_missing_file_lists_similar_model_files_beside_it(tmp_path):
    for name in (
        "v1-5-pruned-emaonly.safetensors",
        "sd_xl_base_1.0.safetensors",
        "dreamshaper_8.ckpt",
        "notes.txt",
    ):
        (tmp_path / name).write_bytes(b"x")
    message = refused(tmp_path / "v1-5-pruned.safetensors", "no such file", "v1-5-pruned-emaonly.safetensors")
    assert "dreamshaper_8.ckpt" in message and "notes.txt" not in message
    assert message.index("v1-5-pruned-emaonly") < message.index("dreamshaper_8")  # closest name first
    refused(tmp_path / "nowhere" / "model.safetensors", "its folder", "does not exist either")


def test_folder_instead_of_a_file_says_if_it_is_a_diffusers_folder(tmp_path):
    diffusers = tmp_path / "stable-diffusion-v1-5"
    (diffusers / "unet").mkdir(parents=True)
    (diffusers / "model_index.json").write_text("{}")
    refused(diffusers, "diffusers folder")
    plain = tmp_path / "loras"
    plain.mkdir()
    (plain / "detail.safetensors").write_bytes(b"x")
    refused(plain, "it is a folder holding detail.safetensors", what="LoRA")


@pytest.mark.parametrize("name", ["empty.safetensors", "empty.ckpt"])
def test_empty_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    refused(tmp_path / name, "the file is empty")


@pytest.mark.parametrize("name", ["model.gguf", "model.onnx", "model"])
def test_unsupported_suffix(tmp_path, name):
    (tmp_path / name).write_bytes(b"GGUF....")
    refused(tmp_path / name, "unsupported suffix", ".safetensors, .sft, .ckpt")


# --- broken safetensors -----------------------------------------------------------------------------------


def test_truncated_files(valid_file, tmp_path):
    raw = valid_file.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    cut_header = tmp_path / "cut_header.safetensors"
    cut_header.write_bytes(raw[: header_end // 2])
    refused(cut_header, "header length field says", "truncated?")
    cut_data = tmp_path / "cut_data.safetensors"
    cut_data.write_bytes(raw[:-4])
    refused(cut_data, "tensor 'b' ends at byte 114", "holds only 110", "(truncated?)")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    refused(tiny, "only 3 bytes")


def test_absurd_header_length_is_refused_before_reading(tmp_path):
    path = write_raw_safetensors(tmp_path / "absurd.safetensors", {}, length=200_000_000)
    refused(path, "header length field says 200,000,000 bytes", "over the 100,000,000-byte limit")


def test_tensor_larger_than_the_file_is_refused_before_allocating(tmp_path):
    header = {"huge": tensor_entry("F32", [1 << 20, 1 << 20], 0, 4 << 40)}  # 4 TiB declared, 16 bytes present
    path = write_raw_safetensors(tmp_path / "huge.safetensors", header, b"\0" * 16)
    refused(path, "tensor 'huge' ends at byte 4,398,046,511,104", "holds only 16")


@pytest.mark.parametrize(
    ("header", "data", "fragments"),
    [
        (b"{not json", b"", ["header is not valid JSON"]),
        (b'{"a": \xff}', b"", ["not UTF-8 text", "0xff"]),
        (b"[1, 2]", b"", ["header is a JSON list, not an object"]),
        ({"__metadata__": {"step": 1}}, b"", ["__metadata__ is not a mapping of strings"]),
        (b'{"a": 1, "a": 2}', b"", ["name 'a' appears twice"]),
        ({"a": [1, 2]}, b"", ["tensor 'a' has entry [1, 2]", "{dtype, shape, data_offsets}"]),
        ({"a": tensor_entry("F4", [2], 0, 1)}, b"\0", ["unsupported dtype 'F4'", "F16, BF16"]),
        ({"a": tensor_entry("F32", [True], 0, 4)}, b"\0" * 4, ["shape [True]", "non-negative integers"]),
        ({"a": tensor_entry("F32", [-1], 0, 4)}, b"\0" * 4, ["shape [-1]"]),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, b"\0" * 4, ["data_offsets [0]"]),
        (
            {"a": tensor_entry("F32", [2, 3], 0, 20)},
            b"\0" * 20,
            ["F32 [2, 3] (24 bytes)", "span 20", "dtype x shape"],
        ),
        (
            {"a": tensor_entry("F32", [2], 0, 8), "b": tensor_entry("F32", [2], 4, 12)},
            b"\0" * 12,
            ["tensors 'a' and 'b' overlap at byte 4", "disjoint"],
        ),
        (
            {"a": tensor_entry("F32", [2], 0, 8), "b": tensor_entry("F32", [2], 12, 20)},
            b"\0" * 20,
            ["4 unclaimed bytes before tensor 'b'"],
        ),
        ({"a": tensor_entry("F32", [2], 0, 8)}, b"\0" * 10, ["2 bytes follow the last tensor"]),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "not-an-object",
        "bad-metadata",
        "duplicate-names",
        "entry-not-a-dict",
        "unknown-dtype",
        "bool-shape",
        "negative-shape",
        "one-offset",
        "offsets-lie-about-size",
        "overlap",
        "gap",
        "trailing-bytes",
    ],
)
def test_malformed_headers(tmp_path, header, data, fragments):
    path = write_raw_safetensors(tmp_path / "broken.safetensors", header, data)
    refused(path, *fragments)
    with pytest.raises(ModelFileError):
        read_header(path)


def test_wrong_content_under_a_model_name(tmp_path, valid_file):
    lfs = tmp_path / "lfs.safetensors"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 4265146304\n")
    refused(lfs, "Git LFS pointer")
    renamed = tmp_path / "renamed.ckpt"
    renamed.write_bytes(valid_file.read_bytes())
    refused(renamed, "safetensors data; rename it to .safetensors")
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"a": torch.ones(1)}, zipped)
    refused(zipped, "PyTorch zip checkpoint")


def test_model_file_error_is_a_value_error_that_survives_pickling(tmp_path):
    error = ModelFileError(
        tmp_path / "x.safetensors", "LoRA", "it targets SDXL (keys lora_te2_*)", "an SD1.5 LoRA"
    )
    assert isinstance(error, ValueError)
    copy = pickle.loads(pickle.dumps(error))
    assert (
        str(copy)
        == str(error)
        == f"LoRA file '{tmp_path / 'x.safetensors'}': it targets SDXL (keys lora_te2_*); expected an SD1.5 LoRA"
    )


def test_missing_keys_are_named_with_a_summary_of_the_file(valid_file):
    refused(
        valid_file, "has no tensor 'zzz'", "them among its 3 keys: ids (1), a (1), b (1)", keys=["a", "zzz"]
    )


def test_safetensors_library_failures_are_translated(valid_file, monkeypatch):
    class PanicException(BaseException):  # what pyo3 raises when the Rust side panics
        pass

    def panicking_open(*args, **kwargs):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(model_files, "safe_open", panicking_open)
    refused(valid_file, "safetensors could not read it (PanicException: called `Option::unwrap()`")


def test_header_bit_flips_never_escape_as_anything_but_model_file_error(tmp_path):
    original = tmp_path / "tiny.safetensors"
    save_file(
        {"a": torch.arange(6.0).reshape(2, 3), "b": torch.arange(4.0).half()}, str(original), {"k": "v"}
    )
    raw = original.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    path = tmp_path / "flipped.safetensors"
    outcomes = {"refused": 0, "loaded": 0}
    for position in range(header_end):
        for flip in [1 << bit for bit in range(8)] + [0xFF]:
            mutated = bytearray(raw)
            mutated[position] ^= flip
            path.write_bytes(mutated)
            try:
                loaded = read_state_dict(path, what="fuzzed file")
            except ModelFileError as error:
                assert str(path) in str(error) and "expected" in str(error)
                outcomes["refused"] += 1
                continue
            outcomes["loaded"] += 1
            # An accepted flip (e.g. in a name or a metadata value) must give exactly what the header says.
            length = int.from_bytes(mutated[:8], "little")
            header = json.loads(mutated[8 : 8 + length])
            header.pop("__metadata__", None)
            assert sorted(loaded) == sorted(header)
            assert read_header(path) == {
                key: TensorSpec(t.dtype, tuple(t.shape)) for key, t in loaded.items()
            }
            for name, info in header.items():
                begin, end = info["data_offsets"]
                dtype = {"F32": torch.float32, "F16": torch.float16}[info["dtype"]]
                stored = bytes(mutated[8 + length + begin : 8 + length + end])
                expected = torch.frombuffer(bytearray(stored), dtype=dtype).reshape(info["shape"])
                assert loaded[name].dtype == dtype and torch.equal(loaded[name], expected)
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0, outcomes


# --- hostile and broken pickles ---------------------------------------------------------------------------


class TouchPayload:
    """Unpickling this creates `target`: the stand-in for arbitrary code run by a malicious checkpoint."""

    def __init__(self, target, via_shell=False):
        self.target, self.via_shell = target, via_shell

    def __reduce__(self):
        if self.via_shell:
            return (os.system, (f"touch '{self.target}'",))
        return (pathlib.Path.touch, (self.target,))


@pytest.mark.parametrize("via_shell", [False, True], ids=["Path.touch", "os.system"])
def test_malicious_pickle_is_refused_without_running(tmp_path, via_shell):
    control = tmp_path / "control-was-run"
    with (tmp_path / "control.pkl").open("wb") as file:
        pickle.dump(TouchPayload(control, via_shell), file)
    with (tmp_path / "control.pkl").open("rb") as file:
        pickle.load(file)  # our own file: shows the payload really runs when unpickled unsafely
    assert control.exists()

    target = tmp_path / "payload-was-run"
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as file:
        pickle.dump({"state_dict": {"w": TouchPayload(target, via_shell)}}, file)
    culprit = "posix.system" if via_shell else "pathlib.Path.touch"
    refused(path, "refused to unpickle it: it would import", culprit, "nothing was run")
    assert not target.exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_malicious_torch_save_checkpoint_is_refused_without_running(tmp_path, zipped):
    target = tmp_path / "payload-was-run"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": {"w": torch.ones(1)}, "callback": TouchPayload(target)}
    torch.save(payload, path, _use_new_zipfile_serialization=zipped)
    refused(path, "refused to unpickle it: it would import", "pathlib.Path", "nothing was run")
    assert not target.exists()


def test_broken_pickles(tmp_path):
    path = tmp_path / "cut.ckpt"
    torch.save({"w": torch.ones(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    refused(path, "torch.load could not read it", "truncated or corrupt?")
    listed = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listed)
    refused(listed, "it holds a list", "a dict of tensors")
    nothing = tmp_path / "nothing.pt"
    torch.save({"global_step": 3}, nothing)
    refused(nothing, "it holds no tensors (top-level entries: ['global_step'])")


# --- key summaries ----------------------------------------------------------------------------------------


def test_describe_keys_summarises_prefixes_in_one_line():
    checkpoint = (
        [f"model.diffusion_model.input_blocks.{i}.weight" for i in range(5)]
        + ["model.diffusion_model.out.0.bias"]
        + [f"first_stage_model.{part}.conv.weight" for part in ("encoder", "decoder", "quant_conv")]
        + [f"cond_stage_model.transformer.text_model.layers.{i}.weight" for i in range(2)]
        + ["alphas_cumprod"]
    )
    assert describe_keys(checkpoint) == (
        "12 keys: model.diffusion_model.* (6), first_stage_model.* (3), "
        "cond_stage_model.transformer.text_model.layers.* (2), alphas_cumprod (1)"
    )
    kohya = [
        f"lora_unet_down_blocks_{i}_proj.{end}" for i in range(20) for end in ("lora_down.weight", "alpha")
    ]
    kohya += [f"lora_te_text_model_encoder_layers_{i}_mlp_fc1.lora_up.weight" for i in range(3)]
    assert describe_keys(kohya) == "43 keys: lora_unet_* (40), lora_te_* (3)"
    assert (
        describe_keys([f"k{i}" for i in range(20)], limit=2)
        == "20 keys: k0 (1), k1 (1), ... (18 more prefixes)"
    )
    assert describe_keys([]) == "0 keys"
