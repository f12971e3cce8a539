"""Issue 11, part 5: faults. Cancelling, an adapter raising mid-forward, and a long session leave nothing behind.

The stack on the model wire is a realistic one: a kohya LoRA (unfused, or fused into the weights for the run),
a ControlNet on the first half of the steps, a T2I-Adapter on the last two thirds, an IP-Adapter and
reference-only control. "Nothing behind" is checked bit for bit: the UNet's tree (its repr) and the raw bytes
of every tensor of the UNet and text encoder state dicts are compared with a snapshot taken before, its
context names too, and the next normal run must equal the same run on a model freshly loaded from the file.
The soak test runs 100 workflows through the headless runner, swapping LoRA files and strengths, ControlNet
and IP-Adapter on and off, and bounds the growth of the process's memory (RSS, < 5 % after warm-up) and of
its open file descriptors (none left open), and checks that the number of live tensors does not grow.
"""

import dataclasses
import gc
import os

import psutil
import pytest
import torch

import fluxion.layers as fl
from fluxion.adapters.lora import LinearLora
from fluxion.layers.chain import ChainError
from fluxion.utils import save_to_safetensors
from foundationals.latent_diffusion.model_patch import SamplingRun, Undo
from foundationals.latent_diffusion.stable_diffusion import StableDiffusion
from nodes import host, sampler_nodes
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CONTROLNET,
    DEMO_IP_ADAPTER,
    DEMO_LORA,
    INPUT_IMAGE,
    SD15_CHECKPOINT,
    kohya_lora,
    tiny_sd15,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionLoraLoader
from nodes.reference_only_nodes import FluxionReferenceOnly
from nodes.runner import NodeFailedError, Runner
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode
from nodes.wires import ClipWire, ModelWire
from tests.robustness.conftest import SD15_T2I

STEPS = 3
SEED = 11
SIZE = dict(width=64, height=64, crop_w=0, crop_h=0, target_width=64, target_height=64)
SECOND_LORA = "fluxion_second_lora.safetensors"
SOAK_RUNS = 100
SOAK_WARM_UP = 10
LORA_EVERY = 4
MAX_RSS_GROWTH = 0.05


def picture(height: int = 64, width: int = 64) -> torch.Tensor:
    y = torch.linspace(0, 1, height)[:, None, None]
    x = torch.linspace(0, 1, width)[None, :, None]
    return (y * (1 - x) * torch.tensor([1.0, 0.6, 0.3]) + x * 0.2).expand(height, width, 3)[None].contiguous()


def adapter_stack(wires, fuse: bool) -> tuple[ModelWire, ClipWire]:  # noqa: ANN001
    """LoRA, ControlNet (steps 0-50 %), T2I-Adapter (30-100 %), IP-Adapter and reference-only on the model."""
    model, clip, vae = wires
    model, clip, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.8, 1.0, fuse)
    controlnet = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(model, controlnet, picture(), 0.9, 0.0, 0.5, "balanced")[0]
    t2i = FluxionControlLoader().load(SD15_T2I)[0]
    model = FluxionApplyControl().apply(model, t2i, picture(), 0.7, 0.3, 1.0, "balanced")[0]
    ipadapter = FluxionIPAdapterLoader().load(DEMO_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(
        model, ipadapter, clip_vision, picture(), 0.8, "concat", "", 0.0, 1.0
    )[0]
    model = FluxionReferenceOnly().apply(model, vae, picture(), 1.0, 0.5, 0.0, 1.0)[0]
    assert len(model.patches) == 5 and len(clip.patches) == 1
    return model, clip


def run(model: ModelWire, clip: ClipWire) -> torch.Tensor:
    positive = FluxionTextEncode().encode(clip, "a lighthouse, fluxion style", 1, **SIZE)[0]
    negative = FluxionTextEncode().encode(clip, "fog", 1, **SIZE)[0]
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    return sample_latents(model, positive, negative, latent, SEED, STEPS, 4.0, "euler", "normal", 1.0)


def snapshot(sd: StableDiffusion) -> tuple[str, dict[str, torch.Tensor], list[str]]:
    """The UNet's tree, a copy of every UNet and text-encoder tensor, and the UNet's context names."""
    tensors = {f"unet.{k}": v.detach().clone() for k, v in sd.unet.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v.detach().clone() for k, v in sd.text_encoder.state_dict().items()}
    return repr(sd.unet), tensors, sorted(sd.unet.provider.contexts)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_unchanged(sd: StableDiffusion, before: tuple[str, dict[str, torch.Tensor], list[str]]) -> None:
    tree, tensors, contexts = snapshot(sd)
    assert tree == before[0], "the UNet's tree changed (an adapter was left injected or a layer replaced)"
    assert tensors.keys() == before[1].keys()
    changed = [key for key in tensors if not same_bits(tensors[key], before[1][key])]
    assert not changed, f"{len(changed)} tensors changed, e.g. {changed[:3]}"
    assert contexts == before[2]


@pytest.fixture
def fresh_model(robustness_folders) -> StableDiffusion:
    return StableDiffusion.from_checkpoint(robustness_folders / "models" / "checkpoints" / SD15_CHECKPOINT)


def cancel_at(monkeypatch, k: int) -> list[int]:  # noqa: ANN001
    """Request a cancel at the k-th check of the sampler (0: before patching; n: after step n)."""
    checks: list[int] = []

    def throw_if_interrupted() -> None:
        if len(checks) == k:
            host.request_cancel()  # what the user's stop button does; the host's own check raises
        checks.append(len(checks))
        host.throw_if_interrupted()

    monkeypatch.setattr(sampler_nodes, "throw_if_interrupted", throw_if_interrupted)
    return checks


@pytest.mark.parametrize("fuse", [False, True], ids=["lora-unfused", "lora-fused"])
def test_cancel_at_every_step_leaves_model_bit_identical(sd15, fresh_model, monkeypatch, fuse):
    sd = sd15[0].model
    model, clip = adapter_stack(sd15, fuse)
    run(model, clip)  # warm-up: contexts the UNet keeps between runs (timestep, text) exist from here on
    before = snapshot(sd)
    for k in range(STEPS + 1):
        with monkeypatch.context() as patch:
            checks = cancel_at(patch, k)
            with pytest.raises(host.Cancelled):
                run(model, clip)
        assert checks == list(range(k + 1)), f"cancelled at check {len(checks) - 1}, wanted {k}"
        assert_unchanged(sd, before)
    after_cancels = run(model, clip)
    on_fresh = run(
        dataclasses.replace(model, model=fresh_model), dataclasses.replace(clip, model=fresh_model)
    )
    assert torch.isfinite(after_cancels).all()
    assert torch.equal(after_cancels, on_fresh)
    assert_unchanged(sd, before)


def test_cancel_between_nodes_of_the_runner_keeps_its_cache_usable(robustness_folders, monkeypatch):
    prompt = soak_prompt(DEMO_LORA, 0.8, True, control=True, ip_adapter=True, seed=1)
    runner = Runner()
    first = runner.run(prompt)
    host.request_cancel()
    with pytest.raises(host.Cancelled):
        runner.run(
            dict(prompt, sampler=dict(prompt["sampler"], inputs=dict(prompt["sampler"]["inputs"], seed=2)))
        )
    again = runner.run(prompt)
    assert torch.equal(again.outputs["sampler"][0]["samples"], first.outputs["sampler"][0]["samples"])


# --- an adapter raising mid-forward ---------------------------------------------------------------------------


class Boom(RuntimeError):
    pass


def raise_on_call(k: int):  # noqa: ANN201
    """A forward that raises on its k-th call (the LoRA layers of one UNet call are called together)."""
    calls = [0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        calls[0] += 1
        if calls[0] == k:
            raise Boom(f"LoRA layer failed on call {k}")
        return original(self, x)

    original = LinearLora.forward
    return forward


def causes(error: BaseException) -> list[BaseException]:
    chain = []
    while error is not None:
        chain.append(error)
        error = error.__cause__
    return chain


def lora_calls_per_unet_call(model: ModelWire, clip: ClipWire, monkeypatch) -> int:  # noqa: ANN001
    calls = [0]
    original = LinearLora.forward

    def counting(self, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        calls[0] += 1
        return original(self, x)

    with monkeypatch.context() as patch:
        patch.setattr(LinearLora, "forward", counting)
        run(model, clip)
    assert calls[0] % STEPS == 0 and calls[0] > 0
    return calls[0] // STEPS


def test_a_lora_layer_raising_mid_forward_propagates_and_everything_is_ejected(
    sd15, fresh_model, monkeypatch
):
    sd = sd15[0].model
    model, clip = adapter_stack(sd15, fuse=False)
    per_step = lora_calls_per_unet_call(model, clip, monkeypatch)
    before = snapshot(sd)
    for step in range(STEPS):
        k = step * per_step + per_step // 2 + 1  # in the middle of step `step`'s UNet call
        with monkeypatch.context() as patch:
            patch.setattr(LinearLora, "forward", raise_on_call(k))
            with pytest.raises(ChainError) as caught:
                run(model, clip)
        chain = causes(caught.value)
        assert isinstance(chain[-1], Boom) and f"on call {k}" in str(caught.value)
        assert "LinearLora" in str(caught.value)  # the message says where in the tree it failed
        assert_unchanged(sd, before)
    fresh = dataclasses.replace(model, model=fresh_model)
    assert torch.equal(run(model, clip), run(fresh, dataclasses.replace(clip, model=fresh_model)))


@dataclasses.dataclass(frozen=True)
class FaultyPatch:
    """A ModelPatch whose injected forward hook raises at one step (a buggy third-party adapter)."""

    fail_at_step: int
    label: str = "faulty"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if run is None:
            return lambda: None
        current = [-1]

        def on_step(step: int) -> None:
            current[0] = step

        def hook(module, args):  # noqa: ANN001, ANN202
            if current[0] == self.fail_at_step:
                raise Boom(f"adapter failed at step {self.fail_at_step}")

        run.on_step(on_step)
        attention = next(iter(model.unet.layers(fl.Attention)))  # deep inside the first down block
        handle = attention.register_forward_pre_hook(hook)
        return handle.remove


def test_a_patch_raising_at_step_k_through_the_runner_names_the_node_and_restores(
    sd15, robustness_folders, monkeypatch
):
    sd = sd15[0].model
    model, clip = adapter_stack(sd15, fuse=True)
    before = snapshot(sd)
    for k in range(STEPS):
        faulty = model.with_patch(FaultyPatch(k))
        with pytest.raises(ChainError) as caught:
            run(faulty, clip)
        assert isinstance(causes(caught.value)[-1], Boom) and f"at step {k}" in str(caught.value)
        assert_unchanged(sd, before)
    # Through the runner the failure names the sampler node; the text encodings come from the runner's cache.
    prompt = soak_prompt(DEMO_LORA, 0.8, False, control=True, ip_adapter=False, seed=1)
    runner = Runner()
    first = runner.run(prompt)
    loaded = first.outputs["ckpt"][0].model
    before = snapshot(loaded)
    prompt["sampler"]["inputs"]["seed"] = 2
    with monkeypatch.context() as patch:
        patch.setattr(LinearLora, "forward", raise_on_call(1))
        with pytest.raises(NodeFailedError) as caught:
            runner.run(prompt)
    assert caught.value.node_id == "sampler" and "FluxionSampler" in str(caught.value)
    assert "LoRA layer failed on call 1" in str(caught.value) and isinstance(causes(caught.value)[-1], Boom)
    assert_unchanged(loaded, before)
    prompt["sampler"]["inputs"]["seed"] = 1
    assert torch.equal(
        runner.run(prompt).outputs["sampler"][0]["samples"], first.outputs["sampler"][0]["samples"]
    )


@dataclasses.dataclass(frozen=True)
class BrokenPatch:
    """A ModelPatch that fails to apply, or applies and then fails to undo."""

    fails_in: str
    label: str = "broken"

    def apply(self, model: StableDiffusion, run: SamplingRun | None) -> Undo:
        if self.fails_in == "apply":
            raise Boom("could not apply")

        def undo() -> None:
            raise Boom("could not undo")

        return undo


def test_a_patch_failing_to_apply_or_undo_still_restores_the_rest_of_the_stack(sd15):
    sd = sd15[0].model
    model, clip = adapter_stack(sd15, fuse=True)
    before = snapshot(sd)
    stacks = {
        "apply": dataclasses.replace(
            model, patches=(*model.patches[:3], BrokenPatch("apply"), *model.patches[3:])
        ),
        "undo": dataclasses.replace(
            model, patches=(*model.patches[:3], BrokenPatch("undo"), *model.patches[3:])
        ),
    }
    for fails_in, broken in stacks.items():
        with pytest.raises(Boom, match=f"could not {fails_in}"):
            run(broken, clip)
        assert_unchanged(sd, before)  # the LoRA (fused), ControlNet, T2I-Adapter and the rest are undone


# --- a long session -------------------------------------------------------------------------------------------


def soak_prompt(lora: str, strength: float, fuse: bool, control: bool, ip_adapter: bool, seed: int) -> dict:
    """An API prompt: checkpoint -> LoRA -> [ControlNet] -> [IP-Adapter] -> sampler (2 steps) -> decode -> save."""
    encode = dict(clip=["lora", 1], clip_skip=1, **SIZE)
    prompt = {
        "ckpt": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": SD15_CHECKPOINT}},
        "lora": {
            "class_type": "FluxionLoraLoader",
            "inputs": {
                "model": ["ckpt", 0],
                "clip": ["ckpt", 1],
                "lora_name": lora,
                "strength_model": strength,
                "strength_clip": strength,
                "fuse": fuse,
            },
        },
        "pos": {"class_type": "FluxionTextEncode", "inputs": dict(encode, text="a lighthouse")},
        "neg": {"class_type": "FluxionTextEncode", "inputs": dict(encode, text="fog")},
        "image": {"class_type": "LoadImage", "inputs": {"image": INPUT_IMAGE}},
        "latent": {
            "class_type": "FluxionEmptyLatent",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
    }
    model = ["lora", 0]
    if control:
        prompt["cn"] = {"class_type": "FluxionControlLoader", "inputs": {"control_name": DEMO_CONTROLNET}}
        prompt["apply_cn"] = {
            "class_type": "FluxionApplyControl",
            "inputs": {
                "model": model,
                "control": ["cn", 0],
                "image": ["image", 0],
                "strength": 1.0,
                "start_percent": 0.0,
                "end_percent": 1.0,
                "mode": "balanced",
            },
        }
        model = ["apply_cn", 0]
    if ip_adapter:
        prompt["ip"] = {"class_type": "FluxionIPAdapterLoader", "inputs": {"ipadapter_name": DEMO_IP_ADAPTER}}
        prompt["vision"] = {
            "class_type": "FluxionCLIPVisionLoader",
            "inputs": {"clip_name": DEMO_CLIP_VISION},
        }
        prompt["apply_ip"] = {
            "class_type": "FluxionApplyIPAdapter",
            "inputs": {
                "model": model,
                "ipadapter": ["ip", 0],
                "clip_vision": ["vision", 0],
                "image": ["image", 0],
                "weight": 0.7,
                "combine": "concat",
                "image_weights": "",
                "start_percent": 0.0,
                "end_percent": 1.0,
            },
        }
        model = ["apply_ip", 0]
    prompt["sampler"] = {
        "class_type": "FluxionSampler",
        "inputs": {
            "model": model,
            "positive": ["pos", 0],
            "negative": ["neg", 0],
            "latent_image": ["latent", 0],
            "seed": seed,
            "steps": 2,
            "cfg": 4.0,
            "solver": "euler",
            "schedule": "normal",
            "denoise": 1.0,
        },
    }
    prompt["decode"] = {
        "class_type": "FluxionVAEDecode",
        "inputs": {"vae": ["ckpt", 2], "samples": ["sampler", 0], "tiled": False},
    }
    prompt["save"] = {
        "class_type": "SaveImage",
        "inputs": {"images": ["decode", 0], "filename_prefix": "soak"},
    }
    return prompt


@pytest.fixture
def second_lora(robustness_folders) -> str:
    path = robustness_folders / "models" / "loras" / SECOND_LORA
    if not path.exists():
        save_to_safetensors(path, kohya_lora(tiny_sd15(), seed=12))
    return SECOND_LORA


def open_files() -> list[str]:
    """What this process has open: every descriptor in /proc/self/fd, with its target."""
    folder = "/proc/self/fd"
    found = []
    for fd in os.listdir(folder):
        try:
            found.append(f"{fd} -> {os.readlink(os.path.join(folder, fd))}")
        except OSError:  # the descriptor listdir itself used, already closed
            continue
    return found


def live_tensors() -> int:
    """How many tensors the process holds (a leak of adapters or outputs would grow it run after run)."""
    return sum(1 for item in gc.get_objects() if isinstance(item, torch.Tensor))


def model_files_open(robustness_folders) -> list[str]:  # noqa: ANN001
    models = str(robustness_folders / "models")
    return [entry for entry in open_files() if models in entry]


def test_100_runs_with_swapped_adapters_leak_no_memory_and_no_files(
    robustness_folders, second_lora, tmp_path
):
    process = psutil.Process()
    runner = Runner()
    loras = [DEMO_LORA, second_lora]
    measured: dict[str, float] = {}
    for index in range(SOAK_RUNS):
        lora = (
            index // LORA_EVERY
        )  # a new LoRA file/strength/fusing every few runs (reloading one costs ~0.4 s)
        prompt = soak_prompt(
            loras[lora % 2],
            strength=0.5 + (lora % 7) / 10,
            fuse=lora % 3 != 0,
            control=index % 2 == 0,
            ip_adapter=index % 4 < 2,
            seed=index,
        )
        result = runner.run(prompt)
        assert "sampler" in result.executed and "save" in result.executed
        if index == SOAK_WARM_UP - 1:
            gc.collect()
            measured["rss"], measured["fds"] = process.memory_info().rss, len(open_files())
            measured["tensors"] = live_tensors()
            assert not model_files_open(robustness_folders), "a model file was left open after loading"
    gc.collect()
    rss, fds, tensors = process.memory_info().rss, len(open_files()), live_tensors()
    growth = (rss - measured["rss"]) / measured["rss"]
    print(f"soak: live tensors {measured['tensors']} -> {tensors}")
    print(
        f"soak: RSS {measured['rss'] / 2**20:.1f} -> {rss / 2**20:.1f} MiB ({growth:+.2%}), fds {measured['fds']} -> {fds}"
    )
    assert growth < MAX_RSS_GROWTH, f"RSS grew {growth:.1%} over {SOAK_RUNS - SOAK_WARM_UP} runs"
    assert fds <= measured["fds"], f"{fds - measured['fds']} file descriptors more than after warm-up"
    leaked = tensors - measured["tensors"]
    assert leaked < SOAK_RUNS - SOAK_WARM_UP, f"{leaked} more live tensors: something is kept every run"
    assert not model_files_open(robustness_folders), "a model file was left open after loading"
    saved = list((tmp_path / "output").glob("soak_*.png"))
    assert len(saved) == SOAK_RUNS
