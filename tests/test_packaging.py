"""`pip install .` gives a usable library: the README's snippets run as saved scripts outside the repository.

The wheel is built from this checkout (setuptools, no build isolation, no download), installed into a folder of
its own with `pip install --target`, and the scripts run with only that folder added to the path: nothing of the
repository is importable except what the wheel installed.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fluxion.utils import save_to_safetensors
from foundationals.latent_diffusion.checkpoint_export import save_single_file
from nodes.demo import kohya_lora, tiny_sd15

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source") / "ComfyUI-Fluxion"  # setuptools builds in the tree: a copy
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md", "__init__.py"):
        shutil.copy2(REPO / name, source / name)
    for name in ("fluxion", "foundationals", "nodes", "examples", "web"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    command = ["pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)]
    build = subprocess.run(
        [sys.executable, "-m", *command],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel_file,) = out.glob("*.whl")
    return wheel_file


@pytest.fixture(scope="module")
def site(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("site")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        capture_output=True,
        text=True,
    )
    assert install.returncode == 0, install.stderr
    return target


def readme_python_blocks() -> list[str]:
    section = (REPO / "README.md").read_text().split("## Library usage", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_script(code: str, site: Path, cwd: Path) -> subprocess.CompletedProcess:
    script = cwd / "snippet.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True)


def test_the_wheel_installs_the_library_and_the_pack_but_no_top_level_nodes(wheel: Path):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if "/" in name and ".dist-info" not in name}
    assert top_level == {"fluxion", "foundationals", "comfyui_fluxion"}
    assert "comfyui_fluxion/nodes/registry.py" in names
    assert "comfyui_fluxion/__init__.py" in names
    for root in ("foundationals", "comfyui_fluxion/foundationals"):
        assert f"{root}/clip/bpe_simple_vocab_16e6.txt.gz" in names  # the tokenizer's vocabulary
    assert "comfyui_fluxion/examples/workflows/sd15_txt2img.api.json" in names  # what the demo runs


def test_the_readme_snippets_run_as_saved_scripts_outside_the_repository(site: Path, tmp_path: Path):
    framework, stable_diffusion = readme_python_blocks()
    result = run_script(framework, site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LoraAdapter" in result.stdout  # the printed tree shows the injected adapters

    model = tiny_sd15()  # the README's file names, holding tiny random weights
    save_single_file(model, tmp_path / "v1-5-pruned-emaonly.safetensors")
    save_to_safetensors(tmp_path / "style_lora.safetensors", kohya_lora(model))
    check = "\nimport fluxion, foundationals\nprint(fluxion.__file__)\nprint(foundationals.__file__)\n"
    result = run_script(stable_diffusion + check, site, tmp_path)
    assert result.returncode == 0, result.stderr
    assert all(Path(line).is_relative_to(site) for line in result.stdout.split())  # the wheel's, not ours
    from PIL import Image

    with Image.open(tmp_path / "lighthouse.png") as image:
        assert image.size == (512, 512) and image.mode == "RGB"


def test_the_installed_pack_loads_as_comfyui_loads_it(site: Path, tmp_path: Path):
    code = (
        "import comfyui_fluxion, importlib.util\n"
        "print(len(comfyui_fluxion.NODE_CLASS_MAPPINGS), importlib.util.find_spec('nodes'))\n"
    )
    result = run_script(code, site, tmp_path)
    assert result.returncode == 0, result.stderr
    count, nodes_spec = result.stdout.split()
    assert int(count) > 10 and nodes_spec == "None"  # ComfyUI's own `nodes` is never shadowed
