"""Control-LoRA (SDXL): the ControlNet built from the UNet plus the file's deltas is the one derived by hand.

The reference is `tests/support/tiny_control_lora.py`: a tiny SDXL UNet on diffusers' weights (LDM names from
diffusers' own conversion), a Control-LoRA file in Stability's layout for it, and the plain lllyasviel ControlNet
it stands for (UNet weight + up @ down; full tensors replace), loaded by our ControlNet loader. Compared: every
weight, and the residuals for the same inputs. Tolerance: `control_lora` (tests/support/parity.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fluxion.utils import save_to_safetensors
from foundationals.formats.ldm import ldm_unet_key_map
from foundationals.latent_diffusion.adapters.controlnet import (
    ControlLoraPatch,
    ControlMismatchError,
    ControlNet,
    ControlNetPatch,
    base_tensors,
    load_control_lora,
    load_controlnet,
)
from foundationals.latent_diffusion.adapters.ip_adapter import ImageEmbeddings, ip_adapter_from_state_dict
from foundationals.latent_diffusion.adapters.ip_adapter.adapter import IPAdapterPatch
from foundationals.latent_diffusion.model_config import TINY_UNET
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from foundationals.latent_diffusion.sampling import SizeConditioning
from foundationals.latent_diffusion.solvers import make_solver
from foundationals.latent_diffusion.unet import UNet
from foundationals.model_files import ModelFileError
from nodes.demo import TINY_BIGG_PROJECTION, tencent_ip_adapter, tiny_sdxl
from tests.support.parity import assert_parity
from tests.support.tiny_control_lora import merged_controlnet, stability_control_lora, tiny_sdxl_base

LATENT = 8


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("control_lora")
    unet, ldm = tiny_sdxl_base()
    tensors = stability_control_lora(ldm)
    save_to_safetensors(folder / "control-lora-canny-rank4.safetensors", tensors)
    save_to_safetensors(folder / "merged.safetensors", merged_controlnet(ldm, tensors))
    return SimpleNamespace(
        unet=unet,
        control_lora=folder / "control-lora-canny-rank4.safetensors",
        merged=folder / "merged.safetensors",
        tensors=tensors,
        folder=folder,
    )


def residuals(controlnet: ControlNet, seed: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    config = controlnet.config.unet
    controlnet.set_timestep(torch.tensor([411.0, 37.0]))
    controlnet.set_clip_text_embedding(torch.randn(2, 7, config.context_dim, generator=generator))
    controlnet.set_sdxl_conditioning(
        torch.randn(2, config.pooled_text_dim, generator=generator),
        torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0], [40.0, 24.0, 4.0, 2.0, 32.0, 32.0]]),
    )
    size = LATENT * controlnet.config.downscale_factor
    controlnet.set_hint(torch.rand(2, 3, size, size, generator=generator))
    with torch.no_grad():
        return list(controlnet(torch.randn(2, 4, LATENT, LATENT, generator=generator)))


def test_weights_are_the_unet_weights_plus_up_down(files):
    control_lora = load_control_lora(files.control_lora)
    built = control_lora.controlnet(files.unet).state_dict()
    expected = load_controlnet(files.merged, base=files.unet.config).state_dict()
    assert set(built) == set(expected)
    assert_parity("control_lora", [built[key] for key in expected], list(expected.values()))
    unet = files.unet.state_dict()
    _, pairs = control_lora.tensors()
    moved = [key for key in pairs if (built[key] - unet[key]).abs().max() > 1e-3]
    assert len(moved) == len(pairs) > 50  # every low-rank pair really changes its weight


def test_residuals_equal_the_merged_controlnet(files):
    built = load_control_lora(files.control_lora).controlnet(files.unet)
    expected = load_controlnet(files.merged, base=files.unet.config)
    ours, theirs = residuals(built), residuals(expected)
    assert len(ours) == 10 and min(r.abs().max().item() for r in theirs) > 1e-3
    assert_parity("control_lora", ours, theirs)


def test_the_controlnet_loader_builds_it_given_the_unet_and_refuses_it_without(files):
    built = load_controlnet(files.control_lora, unet=files.unet)
    assert_parity("control_lora", residuals(built), residuals(load_controlnet(files.merged)))
    with pytest.raises(ModelFileError) as error:
        load_controlnet(files.control_lora)
    message = str(error.value)
    assert "control-lora-canny-rank4.safetensors" in message and "Control-LoRA" in message
    assert "no UNet" in message


def test_on_sd15_it_is_refused_naming_both_families(files):
    sd15 = UNet(TINY_UNET, device="meta")
    patch = ControlLoraPatch(load_control_lora(files.control_lora), torch.zeros(1, 32, 32, 3))
    with pytest.raises(ControlMismatchError, match="Control-LoRA is for SDXL.*the model is SD1.5"):
        patch.apply(SimpleNamespace(unet=sd15), None)  # type: ignore[arg-type]
    with pytest.raises(ModelFileError, match="control-lora-canny-rank4.safetensors.*SD1.5"):
        load_controlnet(files.control_lora, unet=sd15)


def test_wrong_and_incomplete_files_get_clear_errors(files):
    with pytest.raises(ModelFileError, match="merged.safetensors.*not a Control-LoRA"):
        load_control_lora(files.merged)
    broken = dict(files.tensors)
    del broken["zero_convs.3.0.weight"]
    save_to_safetensors(files.folder / "broken.safetensors", broken)
    with pytest.raises(ModelFileError, match="broken.safetensors.*missing.*zero_convs.3.0.weight"):
        load_control_lora(files.folder / "broken.safetensors")
    odd = dict(files.tensors)
    odd["input_blocks.1.0.in_layers.2.down"] = torch.zeros(4, 7, 3, 3)
    save_to_safetensors(files.folder / "odd.safetensors", odd)
    with pytest.raises(ModelFileError, match="odd.safetensors.*input_blocks.1.0.in_layers.2"):
        load_control_lora(files.folder / "odd.safetensors")


def test_adapters_already_on_the_unet_are_read_as_the_layers_they_adapt(files):
    unet = files.unet
    before = base_tensors(unet)
    assert list(before) == list(unet.state_dict())
    sd = SimpleNamespace(unet=unet)
    run = SamplingRun(4, 0, LATENT, LATENT, 1, uses_guidance=False)
    other = ControlNetPatch(load_controlnet(files.merged), torch.rand(1, 64, 64, 3))
    ip = ip_adapter_from_state_dict(tencent_ip_adapter(sd, embedding_dim=TINY_BIGG_PROJECTION))  # type: ignore[arg-type]
    embeds = ImageEmbeddings(
        torch.randn(1, TINY_BIGG_PROJECTION), torch.zeros(1, TINY_BIGG_PROJECTION), "image_embeds"
    )
    with patched(sd, [other, IPAdapterPatch(ip, embeds)], run):  # type: ignore[arg-type]
        assert list(unet.state_dict()) != list(before)  # the tree has adapters now
        during = base_tensors(unet)
        built = load_control_lora(files.control_lora).controlnet(unet)
    assert list(during) == list(before) and all(during[key] is before[key] for key in before)
    plain = load_control_lora(files.control_lora).controlnet(unet)
    assert_parity("control_lora", list(built.state_dict().values()), list(plain.state_dict().values()))


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    sd = tiny_sdxl()
    state = sd.unet.state_dict()
    ldm = {theirs: state[ours] for theirs, ours in ldm_unet_key_map(sd.unet).items()}
    path = tmp_path_factory.mktemp("control_lora_sdxl") / "control-lora-depth-rank4.safetensors"
    save_to_safetensors(path, stability_control_lora(ldm, seed=9))
    return sd, load_control_lora(path)


def sample(sd, patches):
    positive, negative = sd.encode_prompts("a house", "blurry", SizeConditioning.for_image(64, 64))
    run = SamplingRun(3, 0, LATENT, LATENT, 1, uses_guidance=True)
    with patched(sd, patches, run):
        return sd.sample(
            (1, 4, LATENT, LATENT),
            positive,
            negative,
            make_solver("ddim", 3),
            5.0,
            3,
            step_hook=run.run_step_hooks,
        )


def test_sampling_ejects_exactly_and_stacks_with_an_ip_adapter(sdxl):
    sd, control_lora = sdxl
    before = {key: tensor.clone() for key, tensor in sd.unet.state_dict().items()}
    tree = repr(sd.unet)
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    ip = ip_adapter_from_state_dict(tencent_ip_adapter(sd, seed=13, embedding_dim=TINY_BIGG_PROJECTION))
    embeds = ImageEmbeddings(
        torch.randn(1, TINY_BIGG_PROJECTION), torch.zeros(1, TINY_BIGG_PROJECTION), "image_embeds"
    )
    uncontrolled = sample(sd, [])
    controlled = sample(sd, [ControlLoraPatch(control_lora, hint, strength=0.9)])
    stacked = sample(sd, [IPAdapterPatch(ip, embeds), ControlLoraPatch(control_lora, hint, strength=0.9)])
    assert (controlled - uncontrolled).abs().max() > 1e-3
    assert (stacked - controlled).abs().max() > 1e-3  # the IP-Adapter acts beside it
    assert repr(sd.unet) == tree
    after = sd.unet.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before)  # restored bit for bit
    again = sample(sd, [ControlLoraPatch(control_lora, hint, strength=0.9)])
    assert_parity("control_lora", again, controlled)  # nothing stayed behind from the stacked run
    assert_parity("control_lora", sample(sd, []), uncontrolled)


def test_zero_strength_and_an_empty_window_are_the_uncontrolled_trajectory(sdxl):
    sd, control_lora = sdxl
    hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    uncontrolled = sample(sd, [])
    assert_parity(
        "control_lora", sample(sd, [ControlLoraPatch(control_lora, hint, strength=0.0)]), uncontrolled
    )
    assert_parity(
        "control_lora", sample(sd, [ControlLoraPatch(control_lora, hint, start=0.5, end=0.5)]), uncontrolled
    )
