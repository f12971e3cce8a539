"""A real ComfyUI started for a test: on the CPU, on a free port of 127.0.0.1, with its own base folder.

`FLUXION_COMFYUI` names a ComfyUI checkout (the folder holding `main.py`), `FLUXION_COMFYUI_PYTHON` a python that
runs it (default: this one), `FLUXION_COMFYUI_PORT` a port (default: a free one). The base folder (`--base-directory`) holds the models, custom_nodes, input, output,
temp and user folders; its `custom_nodes/ComfyUI-Fluxion` links to this repository. Nothing is installed.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pytest

REPO = Path(__file__).resolve().parents[2]
COMFYUI = os.environ.get("FLUXION_COMFYUI", "")
PYTHON = os.environ.get("FLUXION_COMFYUI_PYTHON") or sys.executable
START_TIMEOUT_S = 180
FREE_EVERYTHING = {"unload_models": True, "free_memory": True}
FREE_CACHE = {"unload_models": False, "free_memory": True}
"""POST /free bodies: unload every model and empty the output cache; or only empty the cache."""

needs_comfyui = pytest.mark.skipif(
    not (COMFYUI and (Path(COMFYUI) / "main.py").is_file()),
    reason="set FLUXION_COMFYUI to a ComfyUI checkout (and FLUXION_COMFYUI_PYTHON to its python)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ComfyUI: JSON requests, its log, and prompts run to completion."""

    def __init__(self, base: Path, port: int, process: subprocess.Popen, log: Path) -> None:
        self.base, self.url, self.process, self.log = base, f"http://127.0.0.1:{port}", process, log

    def request(self, path: str, data: dict | None = None, timeout: float = 30.0) -> Any:
        body = None if data is None else json.dumps(data).encode()
        request = urllib.request.Request(
            self.url + path, data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def fetch(self, path: str, timeout: float = 30.0) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def rss_bytes(self) -> int:
        """The server process's resident memory."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def latent(self, entry: dict, node: str) -> Any:
        """The latent tensor a core SaveLatent node `node` of a finished prompt wrote."""
        from safetensors.torch import load_file

        item = entry["outputs"][node]["latents"][0]
        path = self.base / "output" / item.get("subfolder", "") / item["filename"]
        return load_file(str(path))["latent_tensor"]

    def run(self, prompt: dict, name: str, timeout_s: float, free: dict | None = FREE_EVERYTHING) -> dict:
        """POST `prompt` (after POST /free `free`, by default everything: no answer from cache) and wait for its
        history entry; fail on an error."""
        if free is not None:
            self.request("/free", free)
        try:
            prompt_id = self.request("/prompt", {"prompt": prompt})["prompt_id"]
        except urllib.error.HTTPError as error:
            pytest.fail(f"{name} rejected by /prompt ({error.code}): {error.read().decode(errors='replace')}")
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                entry = self.request(f"/history/{prompt_id}", timeout=60).get(prompt_id, {})
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                entry = {}  # a server busy loading a model can answer late: ask again until the deadline
            if entry.get("status", {}).get("status_str") in ("success", "error"):
                break
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited during {name}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.request("/interrupt", {})
                pytest.fail(f"{name} did not finish within {timeout_s} s:\n{self.log_tail()}")
            time.sleep(0.5)
        status = entry["status"]
        errors = [message[1] for message in status.get("messages", []) if message[0] == "execution_error"]
        assert status["status_str"] == "success", f"{name}: {json.dumps(errors, indent=1)[:4000]}"
        return entry


ServerType = TypeVar("ServerType", bound=Server)


def prepare_base(base: Path, custom_nodes: dict[str, Path] | None = None) -> Path:
    """A base folder whose custom_nodes link this repository (and `custom_nodes`: name -> folder)."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "ComfyUI-Fluxion").symlink_to(REPO, target_is_directory=True)
    for name, folder in (custom_nodes or {}).items():
        (base / "custom_nodes" / name).symlink_to(folder, target_is_directory=True)
    for folder in ("models", "input", "output", "user"):
        (base / folder).mkdir(exist_ok=True)
    return base


@contextmanager
def comfyui_server(base: Path, server_class: type[ServerType] = Server) -> Iterator[ServerType]:  # type: ignore[assignment]
    """ComfyUI on `base` until the block ends (then terminated, killed if it must be), driven through a
    `server_class` (a `Server` subclass may add what a test asks of it)."""
    flags_file = Path(COMFYUI) / "comfy" / "cli_args.py"
    flags = flags_file.read_text(errors="replace") if flags_file.is_file() else ""
    if "--base-directory" not in flags:
        pytest.skip("this ComfyUI has no --base-directory (models, custom_nodes, input, output, temp, user)")
    port = int(os.environ.get("FLUXION_COMFYUI_PORT") or _free_port())
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
    server = server_class(base, port, process, log)
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
