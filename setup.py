"""Packaging: `pip install -e .` makes the library and the pack importable from anywhere.

Installed top-level names: `fluxion` and `foundationals` (the library) and `comfyui_fluxion` (the whole pack,
the repository root, with its ComfyUI nodes as `comfyui_fluxion.nodes`). The folder `nodes/` is never installed
as a top-level `nodes`: that would shadow ComfyUI's own `nodes` module in its venv. Metadata: pyproject.toml.
"""

from setuptools import find_packages, setup

LIBRARY = find_packages(include=["fluxion", "fluxion.*", "foundationals", "foundationals.*"])
PACK = ["comfyui_fluxion"] + [
    f"comfyui_fluxion.{name}" for name in find_packages(include=["fluxion*", "foundationals*", "nodes*"])
]
VOCABULARY = ["*.txt.gz", "*.md"]
DATA = {
    "foundationals.clip": VOCABULARY,
    "comfyui_fluxion.foundationals.clip": VOCABULARY,
    "comfyui_fluxion": [
        "examples/workflows/*.json",  # what the demo runs
        "examples/workflows/in_comfyui/*.json",
        "examples/training/*.toml",
        "web/*.js",  # the web extension (WEB_DIRECTORY)
    ],
}

setup(packages=LIBRARY + PACK, package_dir={"comfyui_fluxion": "."}, package_data=DATA)
