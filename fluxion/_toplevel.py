"""Let `fluxion`, `foundationals` and `nodes` be imported from the repository root.

Inside ComfyUI the repository is one package (the pack) and its sub-packages import each
other relatively (`from ...fluxion import layers as fl`). From the repository root (tests,
the CLI, user scripts) the three folders are top-level packages, where such relative imports
would reach past the top. This module registers the repository root as the package
`comfyui_fluxion` (without running its `__init__.py`, which is ComfyUI's entry point) and
aliases every top-level name to the pack's module, so both ways share one set of classes.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from collections.abc import Sequence
from pathlib import Path

PACK_NAME = "comfyui_fluxion"
TOP_LEVEL_PACKAGES = ("fluxion", "foundationals", "nodes")


def _pack_root() -> Path:
    """The pack's folder: the repository root (a checkout, an editable install, ComfyUI's custom_nodes), or,
    for an installed wheel, the `comfyui_fluxion` folder beside this top-level copy of `fluxion`."""
    beside = Path(__file__).resolve().parent.parent
    return beside if (beside / "nodes").is_dir() else beside / PACK_NAME


REPOSITORY_ROOT = _pack_root()


class _AliasLoader(importlib.abc.Loader):
    """Loads `name` by importing `comfyui_fluxion.name` and handing out that same module."""

    def __init__(self, target_name: str) -> None:
        self.target_name = target_name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return importlib.import_module(self.target_name)

    def exec_module(self, module: types.ModuleType) -> None:
        # The import system stamped the alias spec on the shared module: put the real one back.
        module.__spec__ = sys.modules[self.target_name].__spec__ or module.__spec__

    def get_code(self, fullname: str) -> types.CodeType | None:
        """Lets `python -m nodes` run `nodes/__main__.py` through the alias."""
        spec = importlib.util.find_spec(self.target_name)
        assert spec is not None and spec.loader is not None
        return spec.loader.get_code(self.target_name)  # type: ignore[attr-defined]

    def is_package(self, fullname: str) -> bool:
        spec = importlib.util.find_spec(self.target_name)
        return spec is not None and spec.submodule_search_locations is not None


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        # Only submodules of a top-level name already aliased to the pack: a plain `import nodes` elsewhere
        # (ComfyUI's own module) is never redirected, and each top-level `__init__` aliases itself.
        top = fullname.split(".")[0]
        if top == fullname or top not in TOP_LEVEL_PACKAGES:
            return None
        if getattr(sys.modules.get(top), "__name__", None) != f"{PACK_NAME}.{top}":
            return None
        target_name = f"{PACK_NAME}.{fullname}"
        real_spec = importlib.util.find_spec(target_name)
        if real_spec is None:
            return None
        return importlib.machinery.ModuleSpec(
            fullname,
            _AliasLoader(target_name),
            is_package=real_spec.submodule_search_locations is not None,
        )


def alias_to_pack(top_level_name: str) -> None:
    """Replace the top-level module being imported by the pack's module of the same name."""
    if PACK_NAME not in sys.modules:
        pack = types.ModuleType(PACK_NAME, "ComfyUI-Fluxion, imported from the repository root.")
        pack.__path__ = [str(REPOSITORY_ROOT)]
        pack.__spec__ = importlib.machinery.ModuleSpec(PACK_NAME, None, is_package=True)
        pack.__spec__.submodule_search_locations = [str(REPOSITORY_ROOT)]
        sys.modules[PACK_NAME] = pack
    if not any(isinstance(finder, _AliasFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
    sys.modules[top_level_name] = importlib.import_module(f"{PACK_NAME}.{top_level_name}")
