"""The `python -m nodes` command line: subcommands registered by name.

`run WORKFLOW.json [--models-dir DIR] [--output DIR] [--input-dir DIR]` is built in; another
subcommand (e.g. `demo`) is a module calling `register_command(...)`, imported at the end of
this file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import host
from .runner import NodeFailedError, Runner, all_node_classes
from .workflow import WorkflowError, WorkflowFileError, load_workflow


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line, how it adds its arguments, and what it runs."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


class UsageError(Exception):
    """A command-line argument naming no usable file or folder: `main` prints it on one line, exit status 2."""


def register_command(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    handler: Callable[[argparse.Namespace], int],
) -> None:
    """Add a subcommand; `handler` returns the process exit status."""
    COMMANDS[name] = Command(help, configure, handler)


def add_folder_arguments(parser: argparse.ArgumentParser) -> None:
    """The --models-dir/--output/--input-dir options shared by commands that run workflows."""
    parser.add_argument(
        "--models-dir", type=Path, help="folder laid out like ComfyUI's models/ (default: ./models)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path("output"), help="where images are saved (default: ./output)"
    )
    parser.add_argument(
        "--input-dir",
        type=Path,
        help="where LoadImage reads (default: an 'input' folder beside the workflow, else ./input)",
    )
    parser.add_argument(
        "--cpu-dtype",
        choices=host.CPU_DTYPE_CHOICES,
        help="on a CPU: dtype of the UNet and text encoders (default fp32, or FLUXION_CPU_DTYPE); auto = bf16 "
        "where the CPU has AVX512-BF16 or AMX",
    )
    parser.add_argument(
        "--cpu-vae-dtype", choices=("fp32", "bf16"), help="on a CPU: dtype of the VAE (default fp32)"
    )


def use_models_dir(path: Path | None) -> None:
    """Point the host's headless models folder at `path` (when given), which must be a folder."""
    if path is None:
        return
    if not path.is_dir():
        raise UsageError(
            f"--models-dir {path}: no such folder (expected a folder laid out like ComfyUI's models/, "
            "holding checkpoints/, loras/, controlnet/, ...)"
        )
    host.set_models_dir(path)


def apply_folder_arguments(args: argparse.Namespace, workflow_path: Path | None = None) -> None:
    """Point the host's headless folders at what the command line asked for."""
    use_models_dir(args.models_dir)
    host.set_cpu_dtype(getattr(args, "cpu_dtype", None), getattr(args, "cpu_vae_dtype", None))
    host.set_output_directory(args.output)
    host.set_temp_directory(args.output / "temp")
    input_dir = args.input_dir
    if input_dir is None and workflow_path is not None and (workflow_path.parent / "input").is_dir():
        input_dir = workflow_path.parent / "input"
    host.set_input_directory(input_dir if input_dir is not None else Path("input"))


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("workflow", type=Path, help="workflow JSON, API or UI format")
    add_folder_arguments(parser)


def run_command(args: argparse.Namespace) -> int:
    """Run one workflow file and list the images it wrote."""
    apply_folder_arguments(args, args.workflow)
    try:
        workflow = load_workflow(args.workflow, all_node_classes())
        result = Runner().run_workflow(workflow)
    except WorkflowFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except WorkflowError as error:
        print(f"error: {args.workflow}: {error}", file=sys.stderr)
        return 2
    except NodeFailedError as error:
        logging.getLogger(__name__).debug("node failure", exc_info=error)
        print(f"error: {error}", file=sys.stderr)
        return 1
    except host.Cancelled:
        print("cancelled", file=sys.stderr)
        return 130
    for node_id, ui in result.ui.items():
        for image in ui.get("images", []):
            folder = host.output_directory() if image.get("type") == "output" else host.temp_directory()
            print(f"node {node_id}: {folder / image.get('subfolder', '') / image['filename']}")
    return 0


register_command("run", "run a workflow headless", _configure_run, run_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run the chosen subcommand."""
    parser = argparse.ArgumentParser(prog="python -m nodes", description="ComfyUI-Fluxion headless tools")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each node as it runs")
    subcommands = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.configure(subcommands.add_parser(name, help=command.help, description=command.help))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        return COMMANDS[args.command].handler(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


# Subcommands defined elsewhere register themselves on import.
from . import demo, train_command  # noqa: E402,F401
