"""`gitcap score-coco`: BLEU, METEOR, ROUGE-L, CIDEr (and SPICE) of captions."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import console, out_console, output_file, user_errors

EXAMPLE = """

Example:

    gitcap score-coco --results results.tsv --labels test.caption.tsv --out scores.json
"""


def _read_results(path: Path) -> dict[str, str]:
    from gitcli.errors import GitcapError
    from gitcli.formats.coco import read_coco_results
    from gitcli.formats.tsv import read_caption_tsv

    if path.suffix.lower() == ".json":
        return read_coco_results(path)
    results = {}
    for key, caps in read_caption_tsv(path).items():
        if len(caps) != 1:
            raise GitcapError(f"{path}: key {key!r} has {len(caps)} result captions; scoring takes exactly one")
        results[key] = caps[0]
    return results


def _read_labels(path: Path) -> dict[str, list[str]]:
    from gitcli.errors import GitcapError
    from gitcli.formats.coco import read_coco_captions
    from gitcli.formats.tsv import read_caption_tsv

    labels = read_coco_captions(path) if path.suffix.lower() == ".json" else read_caption_tsv(path)
    empty = [k for k, caps in labels.items() if not caps]
    if empty:
        raise GitcapError(f"{path}: image {empty[0]!r} has no reference caption ({len(empty)} such images)")
    return labels


def _versions() -> dict[str, str]:
    import subprocess

    from gitcli import __version__

    out = {"gitcap": __version__, "python": platform.python_version()}
    for pkg in ("pycocoevalcap", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    try:
        java = subprocess.run(["java", "-version"], capture_output=True, text=True, timeout=30)
        out["java"] = (java.stderr or java.stdout).splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        out["java"] = "not found"
    return out


@user_errors
def score_coco(
    results: Annotated[Path, typer.Option("--results", "-r", help="Result captions: GIT result TSV (key<TAB>[{\"caption\": ...}]) or COCO results JSON.")],
    labels: Annotated[Path, typer.Option("--labels", "-l", help="Reference captions: GIT caption TSV or COCO caption annotation JSON.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write scores, per-image scores, inputs and versions to this JSON file.")] = None,
    spice: Annotated[bool, typer.Option("--spice", help="Also compute SPICE (needs Stanford CoreNLP 3.6.0's jars, installed by you: the error says where from).")] = False,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Score the images present in both files and report how many were dropped.")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", min=1, help="Processes to use (default: all CPU cores).")] = None,
) -> None:
    """Score result captions against references with pycocoevalcap (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE with --spice). Scores equal COCOEvalCap's."""
    from rich.table import Table

    from gitcli.config import write_json
    from gitcli.evaluate.align import align_keys
    from gitcli.evaluate.captions import DEFAULT_METRICS, evaluate_captions
    from gitcli.evaluate.java import require_java
    from gitcli.evaluate.paraphrase import cache_root, index_ready

    if out is not None:
        output_file(out)
    require_java("score-coco")
    res = _read_results(results)
    refs = _read_labels(labels)
    res, refs, alignment = align_keys(res, refs, allow_missing=allow_missing)
    if alignment.dropped:
        console.print(
            f"[yellow]scoring {len(refs)} images in both files; dropped {alignment.labels_without_results} labelled "
            f"images without a result and {alignment.results_without_labels} results without labels[/]"
        )
    metrics = (*DEFAULT_METRICS, "SPICE") if spice else DEFAULT_METRICS
    if not index_ready():
        # A plain line, not only the spinner: it is the one long silent step, and a
        # spinner shows nothing when stderr is not a terminal.
        console.print(
            f"indexing METEOR's paraphrase table, once per machine (15-30 s, about 135 MB in {cache_root()})"
        )
    start = time.perf_counter()
    with console.status(f"scoring {len(refs)} images…") as status:
        scored = evaluate_captions(res, refs, metrics, workers=workers, on_step=lambda s: status.update(f"{s}…"))
    seconds = time.perf_counter() - start
    for warning in scored.warnings:
        console.print(f"[yellow]warning:[/] {warning}")

    table = Table(title=f"COCO caption metrics — {len(refs)} images, {seconds:.1f} s")
    table.add_column("metric")
    table.add_column("score", justify="right")
    table.add_column("x100", justify="right")
    for name, value in scored.scores.items():
        table.add_row(name, f"{value:.4f}", f"{100 * value:.2f}")
    out_console.print(table)
    if out is not None:
        write_json(
            out,
            {
                "scores": scored.scores,
                "images": len(refs),
                "dropped": {
                    "labels_without_results": alignment.labels_without_results,
                    "results_without_labels": alignment.results_without_labels,
                },
                "inputs": {"results": str(results.resolve()), "labels": str(labels.resolve())},
                "versions": _versions(),
                "command": " ".join(["gitcap", *sys.argv[1:]]),
                "per_image": scored.per_image,
            },
        )
        console.print(f"wrote {out}")


score_coco.__doc__ = (score_coco.__doc__ or "") + EXAMPLE
