"""The pack inside a real ComfyUI: every API example runs through its server (opt-in).

Set `FLUXION_COMFYUI` to a ComfyUI checkout (the folder holding `main.py`) and `FLUXION_COMFYUI_PYTHON` to
a python that runs it (defaults to this one). The test starts that ComfyUI on the CPU, on a free port of
127.0.0.1 only, with `--base-directory` pointing to a temporary folder (its models, custom_nodes, input, output,
temp and user folders) whose `custom_nodes/` links to this repository and whose `models/` and `input/` hold the
demo's tiny files (`nodes.demo.write_demo_files`). It checks that the pack imports and registers every node,
POSTs each `examples/workflows/*.api.json` to `/prompt` (freeing ComfyUI's cache first), waits for its history
entry and asserts success and the images on disk; then it stops the server. Nothing is installed or downloaded.

    FLUXION_COMFYUI=/path/to/ComfyUI FLUXION_COMFYUI_PYTHON=/path/to/venv/bin/python \\
        python -m pytest tests/nodes/test_real_comfyui.py
"""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "examples" / "workflows").glob("*.api.json"))
COMFYUI = os.environ.get("FLUXION_COMFYUI", "")
PYTHON = os.environ.get("FLUXION_COMFYUI_PYTHON") or sys.executable
START_TIMEOUT_S = 180
RUN_TIMEOUT_S = 900  # one example on a 2-core CPU takes 5-80 s

pytestmark = pytest.mark.skipif(
    not (COMFYUI and (Path(COMFYUI) / "main.py").is_file()),
    reason="set FLUXION_COMFYUI to a ComfyUI checkout (and FLUXION_COMFYUI_PYTHON to its python)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path):
        self.base, self.url, self.process, self.log = base, f"http://127.0.0.1:{port}", process, log

    def request(self, path: str, data: dict | None = None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]


def _supported_flags(comfyui: Path) -> str:
    cli_args = comfyui / "comfy" / "cli_args.py"
    return cli_args.read_text(errors="replace") if cli_args.is_file() else ""


@pytest.fixture(scope="module")
def comfyui(tmp_path_factory):
    from nodes.demo import write_demo_files

    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ComfyUI-Fluxion").symlink_to(REPO, target_is_directory=True)
    write_demo_files(base / "models", base / "input")
    for folder in ("output", "user"):
        (base / folder).mkdir(exist_ok=True)

    flags = _supported_flags(Path(COMFYUI))
    if "--base-directory" not in flags:
        pytest.skip("this ComfyUI has no --base-directory (models, custom_nodes, input, output, temp, user)")
    port = _free_port()
    command = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port)]
    command += ["--base-directory", str(base)]
    if "--database-url" in flags:  # keep the checkout's user/comfyui.db untouched
        command += ["--database-url", "sqlite:///:memory:"]
    if "--disable-auto-launch" in flags:
        command += ["--disable-auto-launch"]
    log = base / "comfyui.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            command, cwd=COMFYUI, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    server = Server(base, port, process, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {process.returncode} while starting:\n{server.log_tail()}")
            try:
                server.request("/system_stats", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"ComfyUI did not answer within {START_TIMEOUT_S} s:\n{server.log_tail()}")
                time.sleep(1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def test_pack_imports_and_registers_every_node(comfyui):
    from nodes.registry import NODE_CLASS_MAPPINGS

    log = comfyui.log_text()
    assert "IMPORT FAILED" not in log, comfyui.log_tail()
    pack_lines = [line for line in log.splitlines() if "ComfyUI-Fluxion" in line]
    assert any("seconds" in line for line in pack_lines), f"the pack is not in the import times:\n{log}"
    object_info = comfyui.request("/object_info", timeout=60)
    missing = sorted(set(NODE_CLASS_MAPPINGS) - set(object_info))
    assert not missing, f"nodes not registered in ComfyUI: {missing}"
    for name in NODE_CLASS_MAPPINGS:
        assert object_info[name]["python_module"].endswith("ComfyUI-Fluxion"), object_info[name]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name.removesuffix(".api.json") for p in EXAMPLES])
def test_api_example_runs(comfyui, example):
    comfyui.request("/free", {"unload_models": True, "free_memory": True})  # no answer from cache
    prompt = json.loads(example.read_text())
    try:
        prompt_id = comfyui.request("/prompt", {"prompt": prompt})["prompt_id"]
    except urllib.error.HTTPError as error:
        pytest.fail(
            f"{example.name} rejected by /prompt ({error.code}): {error.read().decode(errors='replace')}"
        )

    deadline = time.monotonic() + RUN_TIMEOUT_S
    entry = None
    while entry is None:
        history = comfyui.request(f"/history/{prompt_id}").get(prompt_id, {})
        if history.get("status", {}).get("status_str") in ("success", "error"):
            entry = history
        elif comfyui.process.poll() is not None:
            pytest.fail(f"ComfyUI exited during {example.name}:\n{comfyui.log_tail()}")
        elif time.monotonic() > deadline:
            comfyui.request("/interrupt", {})
            pytest.fail(f"{example.name} did not finish within {RUN_TIMEOUT_S} s:\n{comfyui.log_tail()}")
        else:
            time.sleep(0.5)

    status = entry["status"]
    errors = [message[1] for message in status.get("messages", []) if message[0] == "execution_error"]
    assert status["status_str"] == "success", f"{example.name}: {json.dumps(errors, indent=1)[:4000]}"

    saved = [node for node in prompt.values() if node["class_type"] == "SaveImage"]
    images = [image for output in entry["outputs"].values() for image in output.get("images", [])]
    outputs = [image for image in images if image["type"] == "output"]
    assert len(outputs) >= len(saved) > 0, entry["outputs"]
    for image in images:
        path = comfyui.base / image["type"] / image.get("subfolder", "") / image["filename"]  # output, temp
        assert path.is_file() and path.stat().st_size > 0, path
