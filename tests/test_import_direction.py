"""The pack's import graph, read with `ast`: which way imports go between formats, models and nodes.

- `foundationals/formats/` (what each file format looks like) imports no model: only fluxion, `model_files`,
  the model configs (data) and other formats. Models and their loaders import formats, never the other way.
- Model and adapter declarations (`unet`, `auto_encoder`, `adapters/*/model.py`, ...) read no files.
- No module of foundationals/ imports itself back through others at run time (imports under
  `if TYPE_CHECKING:` aside).
- No node module imports another module's private (`_name`) helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("foundationals",)  # the library: fluxion (the framework) is below it, nodes/ above it
MODEL_DECLARATIONS = (
    "foundationals.latent_diffusion.unet",
    "foundationals.latent_diffusion.auto_encoder",
    "foundationals.latent_diffusion.adapters.controlnet.model",
    "foundationals.latent_diffusion.adapters.controlnet.control_lora",
    "foundationals.latent_diffusion.adapters.t2i_adapter.model",
    "foundationals.latent_diffusion.adapters.ip_adapter.model",
    "foundationals.latent_diffusion.adapters.ip_adapter.adapter",
    "foundationals.latent_diffusion.adapters.lora.model",
    "foundationals.latent_diffusion.adapters.reference_only",
    "foundationals.latent_diffusion.adapters.regional",
)
FILE_READERS = (
    "foundationals.model_files",
    "safetensors",
    "foundationals.formats.ip_adapter.read_",
    "torch.load",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _runtime_imports(path: Path) -> set[str]:
    """Absolute names of the modules `path` imports when it runs (at import time or inside functions)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)  # `from . import pipelines`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {
        name: {imported for imported in _runtime_imports(path) if imported in modules and imported != name}
        for name, path in modules.items()
    }


def test_formats_import_no_models() -> None:
    allowed = (
        "fluxion",
        "foundationals.formats",
        "foundationals.model_files",
        "foundationals.latent_diffusion.model_config",
    )
    for module, path in _modules().items():
        imports = _runtime_imports(path)
        if module.startswith("foundationals.formats"):
            wrong = sorted(
                name
                for name in imports
                if name.startswith(("foundationals", "nodes")) and not name.startswith(allowed)
            )
            assert not wrong, f"{module} imports {wrong}: a format module must not know the models"


def test_model_declarations_read_no_files() -> None:
    for module in MODEL_DECLARATIONS:
        path = ROOT / (module.replace(".", "/") + ".py")
        imports = _runtime_imports(path)
        wrong = sorted(name for name in imports if name.startswith(FILE_READERS))
        assert not wrong, (
            f"{module} imports {wrong}: file reading belongs to formats/ and the loading modules"
        )


def test_no_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == 1:
                cycle = path[path.index(imported) :] + [imported]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                walk(imported)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)


def test_nodes_import_no_private_helpers() -> None:
    for path in sorted((ROOT / "nodes").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PACKAGES)):
                private = [alias.name for alias in node.names if alias.name.startswith("_")]
                assert not private, f"{path.name} imports private {private} from {node.module}"
