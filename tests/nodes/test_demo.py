"""`python -m nodes demo`: every example runs on tiny weights, every PNG carries `prompt` and `workflow`, and the
closing lines say what the images are and what to do next."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from nodes import cli, host
from nodes.control_nodes import FluxionCanny
from nodes.demo import EXAMPLES, demo_picture, example_workflows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """One demo run: its exit status, its stdout, and the images it listed by example."""
    import contextlib
    import io

    output = tmp_path_factory.mktemp("demo_output")
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(stdout):
        for folder in ("_models_dir", "_input_dir", "_output_dir", "_temp_dir"):
            patch.setattr(host, folder, getattr(host, folder))  # the demo points them at its own folders
        status = cli.main(["demo", "--output", str(output)])
    lines = stdout.getvalue().splitlines()
    images: dict[str, list[str]] = {}
    for line in lines:
        name, _, location = line.partition(": ")
        if name.endswith(".api.json"):
            images.setdefault(name, []).append(location)
    return status, lines, images


def test_the_demo_runs_every_example_and_lists_its_images(demo_run):
    status, _, images = demo_run
    assert status == 0
    assert sorted(images) == [path.name for path in example_workflows()]


def test_every_demo_png_carries_the_prompt_and_the_editor_twin_as_workflow(demo_run):
    _, _, images = demo_run
    for name, locations in images.items():
        twin = json.loads((EXAMPLES / name.replace(".api.json", ".json")).read_text(encoding="utf-8"))
        prompt = json.loads((EXAMPLES / name).read_text(encoding="utf-8"))
        for location in locations:
            text = Image.open(location).text
            assert json.loads(text["prompt"]) == prompt, location
            assert json.loads(text["workflow"]) == twin, location


def test_the_demo_says_the_images_are_noise_and_what_comes_next(demo_run):
    _, lines, images = demo_run
    count = sum(len(locations) for locations in images.values())
    closing = "\n".join(lines[lines.index(next(line for line in lines if "images written to" in line)) :])
    assert closing.startswith(f"{count} images written to ")
    assert "tiny and random" in closing and "noise by design" in closing
    assert (
        "python -m nodes run examples/workflows/sd15_txt2img.json --models-dir /path/to/ComfyUI/models"
        in closing
    )
    assert "ComfyUI/custom_nodes/" in closing and "drag examples/workflows/sd15_txt2img.json" in closing


def test_the_controlnet_example_finds_edges_in_the_demo_picture(demo_run):
    _, _, images = demo_run
    preview = next(p for p in images["sd15_controlnet_canny.api.json"] if "temp" in p)  # the Canny preview
    edges = np.array(Image.open(preview).convert("L"))
    assert (edges > 128).mean() > 0.01  # outlines of the square and the disc, not an all-black map


def test_the_demo_picture_has_hard_edges_canny_keeps():
    picture = torch.from_numpy(demo_picture()).float()[None] / 255
    edges = FluxionCanny().detect(picture, 0.2, 0.6)[0][0, :, :, 0]
    assert edges[9:12, 20].max() == 1.0  # the square's top side (rows 10..31, columns 8..31)
    assert edges.sum() > 100
