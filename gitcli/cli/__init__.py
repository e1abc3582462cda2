"""The `gitcap` command line: a typer app with one thin module per command.

Nothing heavy is imported here: each command imports torch/transformers inside its
function body, so `gitcap --help` answers instantly.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Optional

import typer

from gitcli import __version__

app = typer.Typer(
    name="gitcap",
    help="Train, run and score CLIP-prefix image-to-text models (captioning and VQA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# (command name, module under gitcli.cli, attribute), in the order --help lists them. The
# attribute is a command function, or a typer.Typer group (e.g. `gitcap tsv images`).
COMMANDS: list[tuple[str, str, str]] = [
    ("demo", "demo", "demo"),
    ("fetch", "fetch", "fetch"),
    ("train", "train", "train"),
    ("caption", "caption", "caption"),
    ("ask", "ask", "ask"),
    ("infer-tsv", "infer_tsv", "infer_tsv"),
    ("score-coco", "score_coco", "score_coco"),
    ("vqa-json", "vqa_json", "vqa_json"),
    ("score-vqa", "score_vqa", "score_vqa"),
    ("tsv", "tsv", "app"),
    ("bench", "bench", "app"),
    ("serve", "serve", "serve"),
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gitcap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
    # The `deepspeed --module gitcli` launcher passes --local_rank=N before the command;
    # the rank is read from LOCAL_RANK, which it sets too.
    local_rank: Annotated[Optional[int], typer.Option("--local_rank", hidden=True)] = None,
) -> None:
    """Train, run and score CLIP-prefix image-to-text models (captioning and VQA)."""


def _register() -> None:
    for name, module, function in COMMANDS:
        mod = importlib.import_module(f"gitcli.cli.{module}")
        command = getattr(mod, function)
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=name)
        else:
            app.command(name, help=command.__doc__)(command)


_register()


def main() -> None:
    from gitcli.model.quiet import install_log_filters

    install_log_filters()
    app()
