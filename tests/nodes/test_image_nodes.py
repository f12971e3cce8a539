"""Runner-only LoadImage/SaveImage/PreviewImage: ComfyUI's file names and PNG metadata."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from nodes.runner import Runner, all_node_classes
from nodes.runner_nodes import LoadImage, PreviewImage, SaveImage
from nodes.workflow import WorkflowError, parse_workflow


def png_text_chunks(path):
    """(type, keyword, text) of every text chunk, read straight from the file."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8].decode()
        body = data[offset + 8 : offset + 8 + length]
        if kind in ("tEXt", "iTXt", "zTXt"):
            keyword, _, text = body.partition(b"\0")
            chunks.append((kind, keyword.decode(), text.decode("latin-1")))
        offset += 12 + length
    return chunks


def load_then_save_ui():
    return {
        "last_node_id": 2,
        "last_link_id": 1,
        "nodes": [
            {
                "id": 1,
                "type": "LoadImage",
                "mode": 0,
                "inputs": [],
                "outputs": [
                    {"name": "IMAGE", "type": "IMAGE", "links": [1]},
                    {"name": "MASK", "type": "MASK", "links": None},
                ],
                "widgets_values": ["rgba.png", "image"],
            },
            {
                "id": 2,
                "type": "SaveImage",
                "mode": 0,
                "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                "outputs": [],
                "widgets_values": ["fluxion/test"],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
        "version": 0.4,
    }


@pytest.fixture
def rgba_input(headless_folders):
    pixels = np.zeros((6, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 255
    pixels[..., 3] = 64
    Image.fromarray(pixels, "RGBA").save(headless_folders["input"] / "rgba.png")
    return pixels


def test_saved_png_carries_prompt_and_workflow_text_chunks_as_comfyui_writes_them(
    headless_folders, rgba_input
):
    ui = load_then_save_ui()
    workflow = parse_workflow(ui, all_node_classes())
    result = Runner().run_workflow(workflow)
    assert result.ui["2"] == {
        "images": [{"filename": "test_00001_.png", "subfolder": "fluxion", "type": "output"}]
    }
    path = headless_folders["output"] / "fluxion" / "test_00001_.png"
    # ComfyUI: PngInfo.add_text("prompt", json.dumps(prompt)) then one chunk per extra_pnginfo key.
    assert png_text_chunks(path) == [
        ("tEXt", "prompt", json.dumps(workflow.prompt)),
        ("tEXt", "workflow", json.dumps(ui)),
    ]
    with Image.open(path) as image:
        assert json.loads(image.text["prompt"]) == workflow.prompt
        assert json.loads(image.text["workflow"]) == ui
        assert np.array(image).shape == (6, 4, 3) and np.array(image)[0, 0].tolist() == [255, 0, 0]


def test_api_run_embeds_the_prompt_only_and_counts_up_like_comfyui(headless_folders, rgba_input):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rgba.png"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ComfyUI"}},
    }
    (headless_folders["output"] / "ComfyUI_00007_.png").write_bytes(b"")  # counting resumes after it
    Runner().run(prompt)
    path = headless_folders["output"] / "ComfyUI_00008_.png"
    assert [chunk[1] for chunk in png_text_chunks(path)] == ["prompt"]
    Runner().run(prompt)
    assert (headless_folders["output"] / "ComfyUI_00009_.png").is_file()


def test_a_batch_saves_one_numbered_file_per_image(headless_folders):
    images = torch.rand(2, 8, 8, 3)
    result = SaveImage().save_images(images, "batch")
    assert [r["filename"] for r in result["ui"]["images"]] == ["batch_00001_.png", "batch_00002_.png"]
    saved = np.array(Image.open(headless_folders["output"] / "batch_00002_.png"))
    assert np.abs(saved / 255.0 - images[1].numpy()).max() <= 1 / 255


def test_save_image_refuses_a_prefix_outside_the_output_folder(headless_folders):
    with pytest.raises(ValueError, match="outside the output folder"):
        SaveImage().save_images(torch.rand(1, 4, 4, 3), "../escape")


def test_preview_image_writes_to_the_temp_folder(headless_folders):
    result = PreviewImage().save_images(torch.rand(1, 4, 4, 3))
    (entry,) = result["ui"]["images"]
    assert entry["type"] == "temp" and entry["filename"].startswith("ComfyUI_temp_")
    assert (headless_folders["temp"] / entry["filename"]).is_file()


def test_load_image_gives_image_and_inverted_alpha_mask(rgba_input):
    image, mask = LoadImage().load_image("rgba.png")
    assert image.shape == (1, 6, 4, 3) and image.dtype == torch.float32
    assert mask.shape == (1, 6, 4)
    assert torch.allclose(mask, torch.full_like(mask, 1 - 64 / 255))


def test_load_image_without_alpha_gives_comfyuis_empty_mask(headless_folders):
    Image.new("RGB", (5, 3), "blue").save(headless_folders["input"] / "rgb.png")
    image, mask = LoadImage().load_image("rgb.png")
    assert image.shape == (1, 3, 5, 3) and mask.shape == (1, 64, 64) and not mask.any()


def test_load_image_inputs_match_comfyui(rgba_input):
    assert LoadImage.INPUT_TYPES() == {"required": {"image": (["rgba.png"], {"image_upload": True})}}
    assert LoadImage.RETURN_TYPES == ("IMAGE", "MASK")
    assert SaveImage.INPUT_TYPES()["required"]["filename_prefix"][1]["default"] == "ComfyUI"
    assert SaveImage.INPUT_TYPES()["hidden"] == {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"}
    assert SaveImage.OUTPUT_NODE and PreviewImage.OUTPUT_NODE and SaveImage.RETURN_TYPES == ()


def test_missing_input_image_is_reported_with_the_node(headless_folders):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    with pytest.raises(
        WorkflowError, match=r"node 1 \(LoadImage\): rejected by the node: Invalid image file: nope.png"
    ):
        Runner().run(prompt)


def test_load_image_reruns_when_the_file_changes(rgba_input, headless_folders):
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "rgba.png"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    runner = Runner()
    runner.run(prompt)
    assert runner.run(prompt).cached == ["1"]
    Image.new("RGB", (4, 6), "green").save(headless_folders["input"] / "rgba.png")
    assert runner.run(prompt).executed == ["1", "2"]
