"""Fluxion Load Face Embeds and Fluxion Apply IP-Adapter FaceID on the demo's tiny files: the node's tokens are
the library's (FaceID, FaceID Plus v2 with its face crop and shortcut weight), the release's LoRA joins the
same model, FaceID stacks with LoRA + ControlNet (+ a plain IP-Adapter) on one model and the model comes back
exactly; wrong files and inputs are refused by name, before anything is applied."""

from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from foundationals.latent_diffusion.adapters.ip_adapter import FaceEmbeddings, IPAdapterPatch
from nodes import host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.control_nodes import FluxionApplyControl, FluxionControlLoader
from nodes.demo import (
    DEMO_CLIP_VISION,
    DEMO_CONTROLNET,
    DEMO_FACE_EMBEDS,
    DEMO_FACEID,
    DEMO_FACEID_LORA,
    DEMO_FACEID_PLUSV2,
    DEMO_FACEID_PLUSV2_LORA,
    DEMO_IP_ADAPTER,
    DEMO_IP_ADAPTER_PLUS,
    DEMO_LORA,
    DEMO_SDXL_FACEID,
    SD15_CHECKPOINT,
    SDXL_CHECKPOINT,
    demo_face_embedding,
    write_demo_files,
)
from nodes.faceid_nodes import FluxionApplyIPAdapterFaceID, FluxionInsightFaceEmbeds, FluxionLoadFaceEmbeds
from nodes.image_prompt_nodes import FluxionApplyIPAdapter, FluxionCLIPVisionLoader, FluxionIPAdapterLoader
from nodes.ip_adapter_embeds_nodes import FluxionEncodeIPAdapterEmbeds
from nodes.latent_nodes import FluxionEmptyLatent
from nodes.lora_nodes import FluxionLoraLoader, LoraPatch
from nodes.sampler_nodes import sample_latents
from nodes.text_nodes import FluxionTextEncode

CROP = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def demo_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    write_demo_files(root / "models", root / "input")
    return root


@pytest.fixture
def models(demo_folders, monkeypatch):
    monkeypatch.setattr(host, "_models_dir", demo_folders / "models")
    monkeypatch.setattr(host, "_input_dir", demo_folders / "input")
    return demo_folders


@pytest.fixture
def model(models):
    return FluxionCheckpointLoader().load(SD15_CHECKPOINT)[0]


def adapter(name):
    return FluxionIPAdapterLoader().load(name)[0]


def face():
    return FluxionLoadFaceEmbeds().load(DEMO_FACE_EMBEDS)[0]


def apply(model, ipadapter, face_embeds, **inputs):
    return FluxionApplyIPAdapterFaceID().apply(model, ipadapter, face_embeds, **inputs)[0]


def test_face_embeds_load_from_the_input_folder_in_every_accepted_format(models):
    loaded = face()
    assert isinstance(loaded, FaceEmbeddings) and loaded.clip is None
    assert torch.equal(loaded.face, torch.from_numpy(demo_face_embedding())[None])
    folder = host.input_directory() / "faces"
    folder.mkdir(exist_ok=True)
    two = torch.randn(2, 512, generator=torch.Generator().manual_seed(5))
    torch.save(two, folder / "two.pt")
    save_file({"face_embeds": two[:, None].contiguous()}, str(folder / "two.safetensors"))
    choices = FluxionLoadFaceEmbeds.INPUT_TYPES()["required"]["face_embeds_name"][0]
    assert {DEMO_FACE_EMBEDS, "faces/two.pt", "faces/two.safetensors"} <= set(choices)
    assert "example.png" not in choices
    for name in ("faces/two.pt", "faces/two.safetensors"):
        assert FluxionLoadFaceEmbeds.VALIDATE_INPUTS(name) is True
        assert torch.equal(FluxionLoadFaceEmbeds().load(name)[0].face, two)
    before = FluxionLoadFaceEmbeds.IS_CHANGED("faces/two.pt")
    torch.save(two[:1], folder / "two.pt")
    assert FluxionLoadFaceEmbeds.IS_CHANGED("faces/two.pt") != before


def test_bad_face_embeds_files_are_refused_by_name(models):
    message = FluxionLoadFaceEmbeds.VALIDATE_INPUTS("missing.npy")
    assert isinstance(message, str) and "'missing.npy' not found" in message and "insightface" in message
    assert "must be a path inside the input folder" in FluxionLoadFaceEmbeds.VALIDATE_INPUTS("../x.npy")
    with pytest.raises(ValueError, match=r"example_ipadapter_embeds.safetensors': IP-Adapter image embeds"):
        FluxionLoadFaceEmbeds().load("example_ipadapter_embeds.safetensors")
    np.save(host.input_directory() / "nan.npy", np.full(512, np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="the face embeddings in nan.npy"):
        FluxionLoadFaceEmbeds().load("nan.npy")


def test_faceid_node_gives_the_library_patch_and_leaves_its_inputs_alone(model):
    ipadapter, embeds = adapter(DEMO_FACEID), face()
    kept = embeds.face.clone()
    wire = apply(model, ipadapter, embeds, weight=0.7, start_percent=0.1, end_percent=0.9)
    (patch,) = wire.patches
    expected = IPAdapterPatch(ipadapter.model, FaceEmbeddings(kept), scale=0.7)
    for ours, theirs in zip(patch.tokens, expected.tokens, strict=True):
        assert torch.equal(ours, theirs)
    assert (patch.scale, patch.start, patch.end) == (0.7, 0.1, 0.9)
    assert patch.tokens[0].shape == (1, 4, 32) and torch.equal(embeds.face, kept)
    assert model.patches == () and "1 face(s)" in patch.label


def test_faceid_plus_v2_reads_the_face_crop_and_weights_its_shortcut(model):
    ipadapter, clip_vision, embeds = (
        adapter(DEMO_FACEID_PLUSV2),
        FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0],
        face(),
    )
    assert ipadapter.model.faceid_v2
    full = apply(model, ipadapter, embeds, clip_vision=clip_vision, image=CROP).patches[0]
    half = apply(model, ipadapter, embeds, weight_faceidv2=0.5, clip_vision=clip_vision, image=CROP).patches[
        0
    ]
    crops = ipadapter.model.encode_images(clip_vision.model, CROP)
    expected = IPAdapterPatch(ipadapter.model, FaceEmbeddings(embeds.face, crops), faceid_v2=0.5)
    for ours, theirs in zip(half.tokens, expected.tokens, strict=True):
        assert torch.equal(ours, theirs)
    assert (full.tokens[0] - half.tokens[0]).abs().max() > 1e-3  # the shortcut weight acts
    other = apply(model, ipadapter, embeds, clip_vision=clip_vision, image=torch.rand(1, 64, 64, 3)).patches[
        0
    ]
    assert (other.tokens[0] - full.tokens[0]).abs().max() > 1e-3  # so does the crop


def test_faceid_plus_takes_its_face_crop_as_embeds_encoded_before(model):
    ipadapter, clip_vision, embeds = (
        adapter(DEMO_FACEID_PLUSV2),
        FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0],
        face(),
    )
    crop = FluxionEncodeIPAdapterEmbeds().encode(ipadapter, clip_vision, CROP)[0]
    from_image = apply(model, ipadapter, embeds, clip_vision=clip_vision, image=CROP).patches[0]
    from_embeds = apply(model, ipadapter, embeds, embeds=crop).patches[0]
    for ours, theirs in zip(from_embeds.tokens, from_image.tokens, strict=True):
        assert torch.equal(ours, theirs)
    with pytest.raises(ValueError, match="got both image and embeds for the face crop"):
        apply(model, ipadapter, embeds, image=CROP, embeds=crop)
    base_embeds = FluxionEncodeIPAdapterEmbeds().encode(adapter(DEMO_IP_ADAPTER), clip_vision, CROP)[0]
    with pytest.raises(
        ValueError, match=r"reads 32-d penultimate hidden states of the face crop; the embeds hold 24-d"
    ):
        apply(model, ipadapter, embeds, embeds=base_embeds)
    with pytest.raises(ValueError, match=r"is a FaceID \(not Plus\).*disconnect image / embeds"):
        apply(model, adapter(DEMO_FACEID), embeds, embeds=crop)


def test_lora_name_puts_the_release_lora_on_the_same_model_before_the_adapter(model):
    wire = apply(model, adapter(DEMO_FACEID), face(), lora_name=DEMO_FACEID_LORA, lora_strength=0.5)
    lora, patch = wire.patches
    assert isinstance(lora, LoraPatch) and isinstance(patch, IPAdapterPatch)
    assert (lora.file_name, lora.strength, lora.for_text) == (DEMO_FACEID_LORA, 0.5, False)
    assert len(lora.lora.weights) == 4 * 2 * 11  # q, k, v, out of every self- and cross-attention
    assert (
        len(apply(model, adapter(DEMO_FACEID), face(), lora_name=DEMO_FACEID_LORA, lora_strength=0.0).patches)
        == 1
    )
    wrong = (
        host.model_file_path("controlnet", DEMO_CONTROLNET).parents[1] / "loras" / "not_a_lora.safetensors"
    )
    shutil.copy(host.model_file_path("controlnet", DEMO_CONTROLNET), wrong)
    try:
        with pytest.raises(ValueError, match="not_a_lora.safetensors.*this is a ControlNet, not a LoRA"):
            apply(model, adapter(DEMO_FACEID), face(), lora_name="not_a_lora.safetensors")
    finally:
        wrong.unlink()


def test_wrong_files_and_inputs_are_refused_by_name_before_anything_is_applied(model):
    faceid, plus = adapter(DEMO_FACEID), adapter(DEMO_FACEID_PLUSV2)
    clip_vision, embeds = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0], face()
    with pytest.raises(
        ValueError, match=f"Fluxion Apply IP-Adapter: IP-Adapter {DEMO_FACEID} is an IP-Adapter FaceID"
    ):
        FluxionApplyIPAdapter().apply(model, faceid, clip_vision, CROP, 0.7)
    with pytest.raises(
        ValueError,
        match=f"Encode IP-Adapter Embeds: IP-Adapter {DEMO_FACEID} is an IP-Adapter FaceID: it reads",
    ):
        FluxionEncodeIPAdapterEmbeds().encode(faceid, clip_vision, CROP)
    for name in (DEMO_IP_ADAPTER, DEMO_IP_ADAPTER_PLUS):
        with pytest.raises(
            ValueError,
            match=f"FaceID: IP-Adapter {name} is a (base|plus) IP-Adapter, it reads reference images",
        ):
            apply(model, adapter(name), embeds)
    with pytest.raises(
        ValueError, match=f"{DEMO_FACEID_PLUSV2} is a FaceID Plus v2: it also reads the face crop"
    ):
        apply(model, plus, embeds, clip_vision=clip_vision)
    with pytest.raises(ValueError, match=f"{DEMO_FACEID} is a FaceID \\(not Plus\\)"):
        apply(model, faceid, embeds, image=CROP)
    with pytest.raises(ValueError, match="2 face crops for 1 face embeddings"):
        apply(model, plus, embeds, clip_vision=clip_vision, image=CROP.expand(2, -1, -1, -1))
    with pytest.raises(ValueError, match=r"face_weights has 2 values for 1 face embedding\(s\)"):
        apply(model, faceid, embeds, face_weights="1, 0.5")
    with pytest.raises(ValueError, match=r"reads 512-d face embeddings \(insightface\); these are 24-d"):
        apply(model, faceid, FaceEmbeddings(torch.zeros(1, 24)))
    with pytest.raises(
        ValueError, match="Fluxion Apply IP-Adapter FaceID \\(model .*unknown IP-Adapter weight_type"
    ):
        apply(model, faceid, embeds, weight_type="sideways")
    with pytest.raises(
        ValueError, match=f"IP-Adapter {DEMO_SDXL_FACEID} does not fit the model {SD15_CHECKPOINT}"
    ):
        apply(model, adapter(DEMO_SDXL_FACEID), embeds, lora_name=DEMO_FACEID_LORA)
    assert model.patches == ()


def test_sdxl_faceid_applies_on_the_sdxl_model(models):
    sdxl = FluxionCheckpointLoader().load(SDXL_CHECKPOINT)[0]
    (patch,) = apply(sdxl, adapter(DEMO_SDXL_FACEID), face()).patches
    assert patch.tokens[0].shape == (1, 4, 48)
    with pytest.raises(
        ValueError, match=f"IP-Adapter {DEMO_FACEID} does not fit the model {SDXL_CHECKPOINT}"
    ):
        apply(sdxl, adapter(DEMO_FACEID), face())


def sample(model, positive, negative):
    latent = FluxionEmptyLatent().generate(64, 64, 1)[0]
    return sample_latents(model, positive, negative, latent, 1, 3, 5.0, "euler", "normal", 1.0)


def test_faceid_stacks_with_lora_controlnet_and_ip_adapter_and_the_model_comes_back_exactly(models):
    model, clip, _ = FluxionCheckpointLoader().load(SD15_CHECKPOINT)
    model, clip, _ = FluxionLoraLoader().load(model, clip, DEMO_LORA, 0.8, 0.8, False)
    control = FluxionControlLoader().load(DEMO_CONTROLNET)[0]
    model = FluxionApplyControl().apply(model, control, CROP, 0.9, 0.0, 1.0, "balanced")[0]
    clip_vision = FluxionCLIPVisionLoader().load(DEMO_CLIP_VISION)[0]
    model = FluxionApplyIPAdapter().apply(model, adapter(DEMO_IP_ADAPTER), clip_vision, CROP, 0.5)[0]
    positive = FluxionTextEncode().encode(clip, "a portrait")[0]
    negative = FluxionTextEncode().encode(clip, "blurry")[0]
    unet = model.model.unet
    tree = repr(unet)
    weights = {name: tensor.clone() for name, tensor in unet.state_dict().items()}
    plain = sample(model, positive, negative)
    faced = apply(
        model,
        adapter(DEMO_FACEID_PLUSV2),
        face(),
        weight=0.9,
        clip_vision=clip_vision,
        image=CROP,
        lora_name=DEMO_FACEID_PLUSV2_LORA,
    )
    without_lora = apply(
        model, adapter(DEMO_FACEID_PLUSV2), face(), weight=0.9, clip_vision=clip_vision, image=CROP
    )
    result, result_without_lora = sample(faced, positive, negative), sample(without_lora, positive, negative)
    assert torch.isfinite(result).all()
    assert (result - plain).abs().max() > 1e-3 and (result - result_without_lora).abs().max() > 1e-3
    # every adapter ejected, every fused weight restored: the tree and the weights are the loader's, bit for bit
    assert repr(unet) == tree
    assert all(torch.equal(unet.state_dict()[name], tensor) for name, tensor in weights.items())
    assert torch.equal(sample(model, positive, negative), plain)  # the shared branch samples as before
    assert torch.equal(sample(faced, positive, negative), result)  # and the FaceID branch as alone


def test_insightface_is_optional_and_its_absence_is_said_clearly(models, monkeypatch):
    monkeypatch.setitem(sys.modules, "insightface", None)  # not importable, as on this machine
    monkeypatch.setitem(sys.modules, "insightface.app", None)
    with pytest.raises(
        RuntimeError, match="needs the optional insightface package.*Fluxion Load Face Embeds"
    ):
        FluxionInsightFaceEmbeds().embed(CROP, "buffalo_l", "CPU")


def test_insightface_embeddings_and_crops_come_from_the_largest_face(models, monkeypatch):
    """A stand-in insightface with its API (FaceAnalysis.prepare/get, face_align.norm_crop): the node takes the
    largest face's normed_embedding, crops on its landmarks, reads the image as BGR uint8."""
    seen = {}

    class Face:
        def __init__(self, size: float, value: float) -> None:
            self.bbox = np.array([0.0, 0.0, size, size])
            self.kps = np.full((5, 2), value)
            self.normed_embedding = np.full(512, value, dtype=np.float32)

    class FaceAnalysis:
        def __init__(self, name, root, providers):
            seen.update(name=name, root=root, providers=providers)

        def prepare(self, ctx_id, det_size):
            seen["prepared"] = (ctx_id, det_size)

        def get(self, image):
            seen.setdefault("images", []).append(image)
            return [Face(10.0, 1.0), Face(30.0, 2.0)] if image[0, 0, 0] > 0 else []

    def norm_crop(image, landmark, image_size):
        seen["landmark"] = landmark
        return np.full((image_size, image_size, 3), (10, 20, 30), dtype=np.uint8)

    package = types.ModuleType("insightface")
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FaceAnalysis
    utils = types.ModuleType("insightface.utils")
    align = types.ModuleType("insightface.utils.face_align")
    align.norm_crop = norm_crop
    for name, module in {
        "insightface": package,
        "insightface.app": app,
        "insightface.utils": utils,
        "insightface.utils.face_align": align,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    image = torch.zeros(1, 16, 16, 3)
    image[..., 2] = 1.0  # blue: BGR puts it first
    embeds, crops = FluxionInsightFaceEmbeds().embed(image, "antelopev2", "CPU")
    assert seen["name"] == "antelopev2" and seen["providers"] == ["CPUExecutionProvider"]
    assert seen["root"] == str(host.models_root() / "insightface")
    assert seen["images"][0].dtype == np.uint8 and tuple(seen["images"][0][0, 0]) == (255, 0, 0)
    assert torch.equal(embeds.face, torch.full((1, 512), 2.0)) and float(seen["landmark"][0, 0]) == 2.0
    assert crops.shape == (1, 224, 224, 3)
    assert torch.allclose(crops[0, 0, 0], torch.tensor([30.0, 20.0, 10.0]) / 255)  # back to RGB
    with pytest.raises(ValueError, match="no face found in image 0"):
        FluxionInsightFaceEmbeds().embed(torch.zeros(1, 16, 16, 3), "buffalo_l", "CPU")
