"""Control-LoRA through the nodes: the ControlNet loader takes the file, Fluxion Apply Control wires it onto an
SDXL model; it stacks with a LoRA and an IP-Adapter, leaves the shared model exactly as it was, builds its
ControlNet from the UNet with the LoRAs before it fused in, and is refused on SD1.5 naming file and model."""

import pytest
import torch

from fluxion.utils import save_to_safetensors
from foundationals.latent_diffusion.adapters.controlnet import ControlLora, ControlMismatchError
from foundationals.latent_diffusion.model_patch import SamplingRun, patched
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.demo import (
    DEMO_CLIP_VISION_BIGG,
    DEMO_CONTROL_LORA,
    DEMO_SDXL_IP_ADAPTER,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
    kohya_lora,
    tiny_sdxl,
    write_demo_files,
)
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionLoraLoader
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionCLIPTextEncodeSDXL
from tests.support.parity import assert_parity

SDXL_LORA = "fluxion_demo_sdxl_lora.safetensors"
HINT = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    unet_only = {k: v for k, v in kohya_lora(tiny_sdxl(), seed=8).items() if k.startswith("lora_unet_")}
    save_to_safetensors(root / "models" / "loras" / SDXL_LORA, unet_only)
    return root / "models"


@pytest.fixture
def models(monkeypatch, demo_models):
    monkeypatch.setattr(host, "_models_dir", demo_models)


def _sample(model, clip) -> torch.Tensor:
    encode = FluxionCLIPTextEncodeSDXL().encode
    positive = encode(clip, "a house", 1, 64, 64, 0, 0, 64, 64)[0]
    negative = encode(clip, "blurry", 1, 64, 64, 0, 0, 64, 64)[0]
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    return sample_latents(model, positive, negative, latent, 7, 3, 5.0, "euler", "normal", 1.0)


def test_control_lora_stacks_with_lora_and_ip_adapter_and_leaves_the_model_exact(models):
    base, clip, _ = FluxionCheckpointLoader().load(SDXL_CHECKPOINT)
    unet = base.model.unet
    before = {key: tensor.clone() for key, tensor in unet.state_dict().items()}
    tree = repr(unet)
    control = FluxionControlLoader().load(DEMO_CONTROL_LORA)[0]
    assert control.kind == "Control-LoRA" and isinstance(control.model, ControlLora)
    with_lora, clip, report = FluxionLoraLoader().load(base, clip, SDXL_LORA, 0.8, 0.0, True)
    ipadapter = FluxionIPAdapterLoader().load(DEMO_SDXL_IP_ADAPTER)[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION_BIGG)[0]
    stacked = FluxionApplyIPAdapter().apply(with_lora, ipadapter, clip_vision, HINT, 0.7)[0]
    stacked = FluxionApplyControl().apply(stacked, control, HINT, 0.9, 0.0, 1.0, "balanced")[0]
    no_control = FluxionApplyIPAdapter().apply(with_lora, ipadapter, clip_vision, HINT, 0.7)[0]

    plain = _sample(base, clip)
    controlled = _sample(stacked, clip)
    uncontrolled = _sample(no_control, clip)
    assert (controlled - uncontrolled).abs().max() > 1e-3  # the Control-LoRA acts in the stack
    assert (uncontrolled - plain).abs().max() > 1e-3  # so do the LoRA and the IP-Adapter
    assert repr(unet) == tree
    after = unet.state_dict()
    assert all(torch.equal(after[key], before[key]) for key in before)  # restored bit for bit
    assert_parity("control_lora", _sample(base, clip), plain)  # branches from one loader stay apart
    assert_parity("control_lora", _sample(stacked, clip), controlled)


def test_the_controlnet_is_built_on_the_unet_with_the_loras_before_it_fused(models):
    base, clip, _ = FluxionCheckpointLoader().load(SDXL_CHECKPOINT)
    sd = base.model
    control_lora = FluxionControlLoader().load(DEMO_CONTROL_LORA)[0].model
    with_lora = FluxionLoraLoader().load(base, clip, SDXL_LORA, 0.8, 0.0, True)[0]
    run = SamplingRun(3, 0, 8, 8, 1, uses_guidance=True)
    bare = control_lora.controlnet(sd.unet).state_dict()
    with patched(sd, list(with_lora.patches), run):
        fused_unet = {key: tensor.clone() for key, tensor in sd.unet.state_dict().items()}
        on_lora = control_lora.controlnet(sd.unet).state_dict()
    unet = sd.unet.state_dict()
    changed = [key for key in unet if not torch.equal(unet[key], fused_unet[key])]
    in_encoder = [key for key in changed if key in on_lora]
    assert in_encoder and all(key.endswith("weight") for key in in_encoder)
    for key in in_encoder:  # the ControlNet moved by what the LoRA moved the UNet's weight
        assert_parity("control_lora", on_lora[key] - bare[key], fused_unet[key] - unet[key])
    untouched = [key for key in bare if key not in changed]
    assert_parity("control_lora", [on_lora[key] for key in untouched], [bare[key] for key in untouched])


def test_on_sd15_the_control_lora_is_refused_naming_file_and_model(models):
    sd15 = FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0]
    control = FluxionControlLoader().load(DEMO_CONTROL_LORA)[0]
    with pytest.raises(ControlMismatchError) as error:
        FluxionApplyControl().apply(sd15, control, HINT, 1.0, 0.0, 1.0, "balanced")
    message = str(error.value)
    assert DEMO_CONTROL_LORA in message and SD15_CHECKPOINT in message
    assert "SDXL" in message and "SD1.5" in message
    assert sd15.patches == ()
