"""Fluxion Train LoRA node and `python -m nodes train CONFIG.toml` on a tiny checkpoint and synthetic images."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from foundationals.latent_diffusion.checkpoint_export import save_single_file
from foundationals.training import load_config
from nodes import cli, host
from nodes.checkpoint_nodes import FluxionCheckpointLoader
from nodes.contract import check_node_contract
from nodes.lora_nodes import FluxionLoraLoader
from nodes.training_nodes import FluxionTrainLora, lora_file_name, split_captions
from tests.support.tiny_training import write_tiny_dataset

warnings.filterwarnings("ignore")
EXAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "training" / "finetune-lora.toml"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops on 2 shared cores: 2 threads can be 100x slower under load
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def wires(headless_folders):
    from nodes.demo import tiny_sd15

    (headless_folders["models"] / "checkpoints").mkdir()
    save_single_file(tiny_sd15(), headless_folders["models"] / "checkpoints" / "tiny.safetensors")
    return FluxionCheckpointLoader().load("tiny.safetensors")


def image_batch(count=2, size=64):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    images = [np.stack([np.sin(x * (5 + i)) * 0.5 + 0.5, y, x * 0 + i / count], -1) for i in range(count)]
    return torch.from_numpy(np.stack(images))


def weights(model):
    return {
        name: tensor.clone()
        for part in (model.unet, model.text_encoder, model.autoencoder)
        for name, tensor in part.state_dict().items()
    }


def test_train_lora_node_keeps_the_contract():
    assert check_node_contract("FluxionTrainLora", FluxionTrainLora) == []


def test_node_trains_into_the_loras_folder_and_leaves_the_model_bit_identical(wires, headless_folders):
    model, clip, _ = wires
    before = weights(model.model)
    result = FluxionTrainLora().train(
        model,
        clip,
        image_batch(),
        "a sine pattern\na striped pattern",
        rank=2,
        steps=3,
        learning_rate=1e-3,
        seed=5,
        lora_name="my lora",
        resolution=64,
        train_text_encoder=True,
    )
    assert result["result"] == ("my lora.safetensors",)
    assert (headless_folders["models"] / "loras" / "my lora.safetensors").is_file()
    after = weights(model.model)
    assert all(torch.equal(before[name], after[name]) for name in before)
    _, _, report = FluxionLoraLoader().load(model, clip, "my lora.safetensors", 1.0, 1.0)
    assert "layers applied" in report and "not applied" not in report


def test_cancel_stops_training_and_leaves_the_model_unchanged(wires, headless_folders):
    model, clip, _ = wires
    before, tree = weights(model.model), repr(model.model.unet)
    host.request_cancel()
    with pytest.raises(host.Cancelled):
        FluxionTrainLora().train(model, clip, image_batch(1), "x", 2, 50, 1e-3, 0, "cancelled", resolution=64)
    assert repr(model.model.unet) == tree
    assert all(torch.equal(before[name], tensor) for name, tensor in weights(model.model).items())
    assert not (headless_folders["models"] / "loras" / "cancelled.safetensors").exists()


def test_captions_one_per_line_or_one_for_all_and_safe_names():
    assert split_captions("a dog\n\n", 3) == ["a dog"] * 3
    assert split_captions("a\nb", 2) == ["a", "b"]
    with pytest.raises(ValueError, match="3 caption lines for 2 images"):
        split_captions("a\nb\nc", 2)
    assert lora_file_name("style") == "style.safetensors"
    with pytest.raises(ValueError, match="letters, digits"):
        lora_file_name("../escape")


# -- The train command -----------------------------------------------------------------------------------


def write_config(folder, **sections):
    from nodes.demo import tiny_sd15

    save_single_file(tiny_sd15(), folder / "tiny.safetensors")
    write_tiny_dataset(folder / "data")
    values = {
        "model": {"checkpoint": '"./tiny.safetensors"', "device": '"cpu"'},
        "lora": {"rank": "2"},
        "dataset": {"folder": '"data"', "resolution": "64"},
        "training": {"steps": "4", "batch_size": "2", "learning_rate": "1e-3"},
        "checkpointing": {"every": "2"},
        "output": {"file": '"out/trained.safetensors"', "save_dtype": '"float32"'},
    }
    for section, keys in sections.items():
        values.setdefault(section, {}).update(keys)
    text = "".join(
        f"[{section}]\n" + "".join(f"{key} = {value}\n" for key, value in keys.items())
        for section, keys in values.items()
    )
    (folder / "train.toml").write_text(text, encoding="utf-8")
    return folder / "train.toml"


def test_train_command_trains_saves_checkpoints_and_the_lora(tmp_path, capsys):
    models = tmp_path / "my_models"
    (models / "checkpoints").mkdir(parents=True)
    config = write_config(
        tmp_path, model={"checkpoint": '"tiny.safetensors"'}, output={"file": '"trained.safetensors"'}
    )
    (tmp_path / "tiny.safetensors").rename(models / "checkpoints" / "tiny.safetensors")  # bare names: models/
    assert cli.main(["train", str(config), "--models-dir", str(models)]) == 0
    captured = capsys.readouterr()
    lora = models / "loras" / "trained.safetensors"
    assert f"LoRA written to {lora}" in captured.out and "loss: first" in captured.out
    assert lora.is_file()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "checkpoint-000002.pt",
        "checkpoint-000004.pt",
    ]
    saves = [line for line in captured.err.splitlines() if "checkpoint saved" in line]
    assert saves == [
        f"step {step}: checkpoint saved to {tmp_path / 'checkpoints' / f'checkpoint-00000{step}.pt'}"
        for step in (2, 4)
    ]


def test_train_command_names_the_models_folder_a_bare_checkpoint_name_is_not_in(tmp_path, capsys):
    config = write_config(
        tmp_path, model={"checkpoint": '"tiny.safetensors"'}
    )  # the file sits beside the config
    assert cli.main(["train", str(config), "--models-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {config}: [model] checkpoint 'tiny.safetensors' is not in {tmp_path / 'data' / 'checkpoints'} "
        f"(no such folder), {tmp_path / 'data' / 'diffusers'} (no such folder) (a bare file name is looked up "
        "in the models folder; write './tiny.safetensors' for a file beside the config)\n"
    )
    assert cli.main(["train", str(config), "--models-dir", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith(f"error: --models-dir {tmp_path / 'nowhere'}: no such folder")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora": {"rnak": "4"}}, r"\[lora\] has unknown key 'rnak'; allowed keys: rank, alpha"),
        ({"dataset": {"folder": '"missing"'}}, r"dataset folder .*missing does not exist"),
        (
            {"model": {"checkpoint": '"./nothing.safetensors"'}},
            r"\[model\] checkpoint .*nothing.safetensors does not exist",
        ),
        ({"training": {"batch_size": "0"}}, r"\[training\] batch_size must be at least 1, got 0"),
    ],
)
def test_train_command_reports_bad_configs(tmp_path, capsys, change, message):
    config = write_config(tmp_path, **change)
    assert cli.main(["train", str(config)]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)


def test_train_command_names_an_image_that_does_not_load(tmp_path, capsys):
    config = write_config(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "data" / "zz.png")
    (tmp_path / "data" / "zz.png").write_bytes(b"\x89PNG broken")
    assert cli.main(["train", str(config)]) == 2
    assert "zz.png: cannot be read as an image" in capsys.readouterr().err


def test_example_config_is_valid_and_names_files_in_the_models_folder(headless_folders):
    models = headless_folders["models"]
    (models / "checkpoints").mkdir()
    (models / "checkpoints" / "v1-5-pruned-emaonly.safetensors").touch()
    config = load_config(EXAMPLE_CONFIG, host.model_search_paths)
    assert config.lora.rank == 16 and config.training.mixed_precision == "bf16"
    assert config.model.checkpoint == str(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors")
    assert config.output.file == str(models / "loras" / "my_lora.safetensors")
