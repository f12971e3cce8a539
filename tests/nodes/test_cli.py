"""`python -m nodes run`: runs a workflow file headless and reports errors with the node."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from nodes import cli

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
