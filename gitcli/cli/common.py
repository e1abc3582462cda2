"""What every command shares: error handling, the console, option aliases.

The same concept has the same option everywhere (DESIGN.md conventions), so options are
declared once here as `Annotated` aliases and reused by the command modules.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional, TypeVar

import typer
from rich.console import Console

from gitcli.errors import GitcapError

# Progress, messages and errors go to stderr; results and summary tables to stdout, so
# `gitcap score-coco ... > scores.txt` captures the scores and a pipe gets only results.
console = Console(stderr=True, highlight=False, soft_wrap=True)
out_console = Console(highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one readable error line and return the exit to raise."""
    console.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def user_errors(fn: F) -> F:
    """Turn a GitcapError into one line and a non-zero exit; Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GitcapError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def output_file(path: Path, *, option: str = "--out") -> Path:
    """Check an output file's place before any work starts: create its folder, or say in
    one line why it cannot be written (a directory in the way, no permission)."""
    path = Path(path)
    if path.is_dir():
        raise GitcapError(f"{option} {path} is a directory; give a file path")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise GitcapError(f"{option} {path}: cannot create its folder ({exc.strerror})") from None
    if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise GitcapError(f"{option} {path}: not writable")
    return path


def input_file(path: Path, *, option: str) -> Path:
    """Check an input file before any work starts (and before a model loads)."""
    path = Path(path)
    if not path.exists():
        raise GitcapError(f"{option} {path}: no such file")
    if path.is_dir():
        raise GitcapError(f"{option} {path} is a folder; give a file")
    if not os.access(path, os.R_OK):
        raise GitcapError(f"{option} {path}: not readable")
    return path


def output_dir(path: Path, *, option: str = "--out") -> Path:
    """Check an output folder before any work starts (it is created by the command)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GitcapError(f"{option} {path} is a file; give a folder")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GitcapError(f"{option} {path}: not writable")
    return path


def given_on_command_line(*names: str) -> list[str]:
    """Which of these options (parameter names) the user typed, as opposed to left at their
    defaults; [] outside a command."""
    try:
        from typer._click.globals import get_current_context  # typer vendors its click
    except ImportError:  # older typer: click itself
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return []
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return [n for n in names if getattr(ctx.get_parameter_source(n), "name", None) in typed]


def print_out(text: str) -> None:
    """Results go to stdout, messages to stderr, so output can be piped."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---- shared options -------------------------------------------------------------------
CheckpointOpt = Annotated[
    Optional[Path],
    typer.Option("--checkpoint", "-c", help="Checkpoint directory, or a training output directory (its latest)."),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DtypeOpt = Annotated[
    str, typer.Option("--dtype", help="Storage dtype of frozen weights: auto, fp32, fp16, bf16.")
]
# loading a checkpoint: None keeps the format it was trained with (train and bench take
# gitcli.cli.model_options.QuantOpt, whose default is "none")
QuantOverrideOpt = Annotated[
    Optional[str], typer.Option(
        "--quant", help="Hold the LM's linear layers quantised: none, bnb-int8, int8-weight, int8-dynamic, fp8 "
                        "(default: as the checkpoint was trained).")
]
PrecisionOpt = Annotated[
    Optional[str], typer.Option("--precision", help="Compute precision: bf16, fp16, fp32 (default: bf16 on GPUs that have it, else fp32).")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per batch.")]
PresetOpt = Annotated[
    Optional[str], typer.Option("--preset", help="Build a built-in model instead of loading one: tiny.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON lines instead of text.")]

# decoding
BeamsOpt = Annotated[int, typer.Option("--beams", min=1, help="Beam width (1 = greedy).")]
MaxNewTokensOpt = Annotated[int, typer.Option("--max-new-tokens", min=1, help="Longest output in tokens.")]
TemperatureOpt = Annotated[
    float, typer.Option("--temperature", min=0.0, help="Sample at this temperature (0 = deterministic).")
]
TopPOpt = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed.")]
CacheOpt = Annotated[str, typer.Option(
    "--cache", help="KV cache: dynamic (grows per step; finished rows leave the batch) or static (allocated once, "
                    "fixed shapes; finished rows run on, masked). Same outputs.")]
DecodeCompileOpt = Annotated[bool, typer.Option(
    "--compile", help="torch.compile the one-token decoding step (a CUDA graph on GPUs); needs --cache static. "
                      "The first batch of each shape pays the compile time.")]
