"""`python -m nodes run`: runs a workflow file headless and reports errors with the node."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nodes import cli
from nodes.runner import all_node_classes
from nodes.workflow import load_workflow

REPO = Path(__file__).resolve().parents[2]


def write_ui_workflow(folder: Path) -> Path:
    ui = {
        "nodes": [
            {
                "id": 1,
                "type": "LoadImage",
                "mode": 0,
                "inputs": [],
                "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [1]}],
                "widgets_values": ["in.png", "image"],
            },
            {
                "id": 2,
                "type": "SaveImage",
                "mode": 0,
                "inputs": [{"name": "images", "type": "IMAGE", "link": 1}],
                "widgets_values": ["cli"],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }
    (folder / "input").mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), "red").save(folder / "input" / "in.png")
    path = folder / "workflow.json"
    path.write_text(json.dumps(ui))
    return path


def test_run_saves_images_and_lists_them(tmp_path, capsys):
    workflow = write_ui_workflow(tmp_path)
    status = cli.main(["run", str(workflow), "--output", str(tmp_path / "out")])  # input/ beside the file
    assert status == 0
    saved = tmp_path / "out" / "cli_00001_.png"
    assert capsys.readouterr().out.strip() == f"node 2: {saved}"
    assert json.loads(Image.open(saved).text["workflow"])["links"] == [[1, 1, 0, 2, 0, "IMAGE"]]


def test_run_reports_workflow_errors_with_status_2(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"1": {"class_type": "KSampler", "inputs": {}}}))
    assert cli.main(["run", str(path)]) == 2
    error = capsys.readouterr().err
    assert "node 1 (KSampler): unknown node type 'KSampler'. Known node types: " in error
    assert "FluxionSampler" in error and "LoadImage" in error


def test_subcommands_register_by_name(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    cli.register_command(
        "hello", "say hello", lambda p: p.add_argument("--name"), lambda a: seen.append(a.name) or 0
    )
    assert cli.main(["hello", "--name", "demo"]) == 0 and seen == ["demo"]
    with pytest.raises(SystemExit):
        cli.main(["nope"])
    assert "invalid choice" in capsys.readouterr().err


def test_python_dash_m_nodes_from_the_repository_root(tmp_path):
    workflow = write_ui_workflow(tmp_path)
    completed = subprocess.run(
        [sys.executable, "-m", "nodes", "run", str(workflow), "--output", str(tmp_path / "out")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    assert (tmp_path / "out" / "cli_00001_.png").is_file()


def run_cli(capsys, *argv):
    """Exit status and stderr of `python -m nodes ARGV`, in process."""
    status = cli.main(list(argv))
    return status, capsys.readouterr().err


def one_line_error(err):
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: "), err
    return err.strip()


def test_a_missing_workflow_file_is_named_in_one_line(tmp_path, capsys):
    missing = tmp_path / "missing.json"
    status, err = run_cli(capsys, "run", str(missing))
    assert status == 2
    assert one_line_error(err) == (
        f"error: {missing}: no such file, expected a workflow .json file (editor or API format)"
    )


def test_a_folder_given_as_workflow_is_named_in_one_line(tmp_path, capsys):
    status, err = run_cli(capsys, "run", str(tmp_path))
    assert status == 2
    assert one_line_error(err) == (
        f"error: {tmp_path}: is a folder, expected a workflow .json file (editor or API format)"
    )


def test_invalid_json_names_the_path_once_with_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "1": {"class_type": "SaveImage"\n}\n')
    status, err = run_cli(capsys, "run", str(path))
    assert status == 2
    assert one_line_error(err) == (
        f"error: {path}: not valid JSON at line 4, column 1: Expecting ',' delimiter"
    )


def test_a_models_dir_that_does_not_exist_is_named(tmp_path, capsys):
    workflow = write_ui_workflow(tmp_path)
    status, err = run_cli(capsys, "run", str(workflow), "--models-dir", str(tmp_path / "nowhere"))
    assert status == 2
    assert one_line_error(err).startswith(
        f"error: --models-dir {tmp_path / 'nowhere'}: no such folder (expected a folder laid out like "
        "ComfyUI's models/"
    )


def test_a_missing_model_names_the_folder_searched_and_where_the_file_is(tmp_path, capsys):
    models = tmp_path / "my_models"
    (models / "checkpoints").mkdir(parents=True)
    (models / "sd15.safetensors").write_bytes(b"")  # directly in models/, not in models/checkpoints/
    path = tmp_path / "load.api.json"
    path.write_text(
        json.dumps(
            {
                "1": {"class_type": "FluxionCheckpointLoader", "inputs": {"ckpt_name": "sd15.safetensors"}},
                "2": {
                    "class_type": "FluxionVAEDecode",
                    "inputs": {"vae": ["1", 2], "samples": ["3", 0], "tiled": False},
                },
                "3": {
                    "class_type": "FluxionEmptyLatent",
                    "inputs": {"width": 64, "height": 64, "batch_size": 1},
                },
                "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
            }
        )
    )
    status, err = run_cli(capsys, "run", str(path), "--models-dir", str(models))
    assert status == 2
    assert one_line_error(err) == (
        f"error: {path}: node 1 (FluxionCheckpointLoader), input 'ckpt_name': checkpoints model "
        f"'sd15.safetensors' not found in {models / 'checkpoints'}; it is at {models / 'sd15.safetensors'}: "
        f"move it into {models / 'checkpoints'}"
    )


def write_api_twin(ui_path, name="workflow.api.json"):
    """The API-format file of the editor workflow at `ui_path`, written beside it, every node titled (as
    ComfyUI's API export writes it; the editor file holds no titles)."""
    prompt = load_workflow(ui_path, all_node_classes()).prompt
    prompt = {node_id: {**node, "_meta": {"title": node["class_type"]}} for node_id, node in prompt.items()}
    api_path = ui_path.with_name(name)
    api_path.write_text(json.dumps(prompt))
    return api_path, prompt


def test_an_api_file_embeds_its_editor_twin_as_the_workflow(tmp_path):
    ui_path = write_ui_workflow(tmp_path)
    api_path, prompt = write_api_twin(ui_path)
    assert cli.main(["run", str(api_path), "--output", str(tmp_path / "out")]) == 0
    text = Image.open(tmp_path / "out" / "cli_00001_.png").text
    assert json.loads(text["prompt"]) == prompt
    assert json.loads(text["workflow"]) == json.loads(ui_path.read_text())


def test_an_api_file_without_a_matching_twin_embeds_only_the_prompt(tmp_path, caplog):
    ui_path = write_ui_workflow(tmp_path)
    lonely, _ = write_api_twin(ui_path, "lonely.api.json")  # no lonely.json beside it
    assert cli.main(["run", str(lonely), "--output", str(tmp_path / "out")]) == 0
    assert set(Image.open(tmp_path / "out" / "cli_00001_.png").text) == {"prompt"}
    api_path, _ = write_api_twin(ui_path)
    ui = json.loads(ui_path.read_text())
    ui["nodes"][1]["widgets_values"] = ["other"]  # the twin no longer gives the same prompt
    ui_path.write_text(json.dumps(ui))
    assert cli.main(["run", str(api_path), "--output", str(tmp_path / "out")]) == 0
    assert set(Image.open(tmp_path / "out" / "cli_00002_.png").text) == {"prompt"}
    assert "is not the editor twin of workflow.api.json" in caplog.text


def test_python_dash_m_nodes_gives_one_line_and_no_traceback_for_a_missing_file(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "nodes", "run", str(tmp_path / "missing.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2
    assert completed.stderr == (
        f"error: {tmp_path / 'missing.json'}: no such file, expected a workflow .json file (editor or API format)\n"
    )
