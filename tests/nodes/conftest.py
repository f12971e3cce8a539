"""Fake node classes for runner tests, and headless folders isolated per test."""

import math

import pytest

from nodes import host

CALLS: list[tuple[str, dict]] = []


def _int(default=0, **extra):
    return ("INT", {"default": default, "min": 0, "max": 1000, "tooltip": "a number", **extra})


class FakeConstant:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": _int(1)}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    def make(self, value):
        CALLS.append(("FakeConstant", {"value": value}))
        return (value,)


class FakeAdd:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"a": ("INT", {"forceInput": True}), "b": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "add"

    def add(self, a, b):
        CALLS.append(("FakeAdd", {"a": a, "b": b}))
        return (a + b,)


class FakeModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"name": (["tiny", "small"], {"tooltip": "which model"})}}

    RETURN_TYPES = ("FAKE_MODEL", "INT")
    FUNCTION = "load"

    def load(self, name):
        CALLS.append(("FakeModelLoader", {"name": name}))
        return ({"model": name}, len(name))


class FakeSampler:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("FAKE_MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 100}),
                "sampler_name": (["euler", "ddim"],),
                "cfg": ("FLOAT", {"default": 7.0, "min": 0.0, "max": 30.0}),
            },
            "optional": {"add_noise": ("BOOLEAN", {"default": True}), "note": ("STRING", {"default": ""})},
        }

    RETURN_TYPES = ("INT",)
    FUNCTION = "sample"

    def sample(self, model, seed, steps, sampler_name, cfg, add_noise=True, note=""):
        CALLS.append(
            (
                "FakeSampler",
                dict(
                    model=model,
                    seed=seed,
                    steps=steps,
                    sampler_name=sampler_name,
                    cfg=cfg,
                    add_noise=add_noise,
                    note=note,
                ),
            )
        )
        return (seed + steps,)


class FakeCollect:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"value": ("INT", {"forceInput": True})},
            "hidden": {"prompt": "PROMPT", "unique_id": "UNIQUE_ID", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    FUNCTION = "collect"
    OUTPUT_NODE = True

    def collect(self, value, prompt=None, unique_id=None, extra_pnginfo=None):
        CALLS.append(("FakeCollect", {"value": value, "unique_id": unique_id}))
        return {"ui": {"values": [value]}}


class FakeVolatile:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": _int(3)}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    @classmethod
    def IS_CHANGED(cls, value):
        return math.nan

    def make(self, value):
        CALLS.append(("FakeVolatile", {"value": value}))
        return (value,)


class FakeBroken:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "explode"

    def explode(self, value):
        raise ValueError("weights are missing")


class FakeWrongArity:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ("INT", "INT")
    FUNCTION = "make"

    def make(self):
        return (1,)


class FakeCancelling:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("INT", {"forceInput": True})}}

    RETURN_TYPES = ("INT",)
    FUNCTION = "make"

    def make(self, value):
        host.request_cancel()  # the user presses stop while this node runs
        return (value,)


FAKE_NODES = {
    cls.__name__: cls
    for cls in (
        FakeConstant,
        FakeAdd,
        FakeModelLoader,
        FakeSampler,
        FakeCollect,
        FakeVolatile,
        FakeBroken,
        FakeWrongArity,
        FakeCancelling,
    )
}


@pytest.fixture
def fake_nodes():
    CALLS.clear()
    yield dict(FAKE_NODES)
    CALLS.clear()


@pytest.fixture
def calls():
    return CALLS


@pytest.fixture(autouse=True)
def headless_folders(tmp_path, monkeypatch):
    """Every test gets its own models/, input/, output/ and temp/ folders and no pending cancel."""
    folders = {name: tmp_path / name for name in ("models", "input", "output", "temp")}
    for folder in folders.values():
        folder.mkdir()
    monkeypatch.setattr(host, "_models_dir", folders["models"])
    monkeypatch.setattr(host, "_input_dir", folders["input"])
    monkeypatch.setattr(host, "_output_dir", folders["output"])
    monkeypatch.setattr(host, "_temp_dir", folders["temp"])
    host.clear_cancel()
    yield folders
    host.clear_cancel()
