"""`gitcap infer-tsv`: batched captioning / VQA over GIT TSVs, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import (BatchSizeOpt, BeamsOpt, CacheOpt, CheckpointOpt, DecodeCompileOpt, DeviceOpt, DtypeOpt,
                               MaxNewTokensOpt, PrecisionOpt, PresetOpt, QuantOverrideOpt, SeedOpt, TemperatureOpt,
                               TopPOpt, console, input_file, out_console, output_file, user_errors)
from gitcli.cli.image_commands import MAX_PIXELS_DEFAULT, MaxPixelsOpt


@user_errors
def infer_tsv(
    images: Annotated[Path, typer.Option("--images", help="GIT image TSV: key<TAB>base64 image.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Result TSV to write (line indexes beside it).", show_default=False)],
    checkpoint: CheckpointOpt = None,
    questions: Annotated[Optional[Path], typer.Option("--questions", help="Question TSV aligned row by row with --images.")] = None,
    coco_json: Annotated[Optional[Path], typer.Option("--coco-json", help="Also write COCO results JSON (captions) or the VQA answer list.")] = None,
    preset: PresetOpt = None,
    beams: BeamsOpt = 1,
    max_new_tokens: MaxNewTokensOpt = 20,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    cache: CacheOpt = "dynamic",
    compile: DecodeCompileOpt = False,
    batch_size: BatchSizeOpt = 32,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOverrideOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = 0,
    max_pixels: MaxPixelsOpt = MAX_PIXELS_DEFAULT,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Discard the rows an earlier run wrote to --out and start over (a rerun otherwise resumes them, and refuses when the model, decoding options or inputs changed).")] = False,
) -> None:
    """Caption (or answer the questions of) every image of a GIT TSV; rerun to resume.

    A rerun resumes only with the same checkpoint, decoding options and inputs (recorded in
    OUT.provenance.json); anything else is refused: choose another --out, or --overwrite.

    Example: gitcap infer-tsv --images test.img.tsv --checkpoint runs/coco --out results.tsv --beams 3
    Several GPUs: torchrun --nproc_per_node 8 -m gitcli infer-tsv ... (rows are split, parts merged in order).
    """
    from rich.table import Table

    from gitcli.config import GenerationConfig
    from gitcli.infer import RuntimeOptions, load_model
    from gitcli.infer_tsv import infer_tsv as run
    from gitcli.infer_tsv import output_lock

    gen = GenerationConfig(max_new_tokens=max_new_tokens, beams=beams, temperature=temperature, top_p=top_p, seed=seed,
                           cache=cache, compile=compile)
    gen.validate()
    input_file(images, option="--images")
    if questions is not None:
        input_file(questions, option="--questions")
    output_file(out)
    if coco_json is not None:
        output_file(coco_json, option="--coco-json")
    runtime = RuntimeOptions(device=device, dtype=None if dtype == "auto" else dtype, quant=quant,
                             precision=precision)
    with output_lock(out):  # before the model loads: a second command into --out is refused at once
        model, dev, prec = load_model(checkpoint, preset, runtime)
        report = run(model, dev, prec, images, out, gen, questions=questions, batch_size=batch_size,
                     coco_json=coco_json, progress=True, overwrite=overwrite, lock=False,
                     max_pixels=max_pixels)
    for row, key, reason in report.failed:
        console.print(f"[bold red]error:[/] row {row} (key {key}): {reason}")
    if report.merged:  # rank 0 of a torchrun job, or the only process
        table = Table(title=f"infer-tsv → {out}", show_header=False)
        table.add_row("image rows", str(report.rows))
        table.add_row("done earlier (skipped)", str(report.skipped))
        table.add_row("done now", str(report.written))
        table.add_row("outputs generated", str(report.outputs))
        table.add_row("failed rows", str(len(report.failed)))
        out_console.print(table)
    if report.failed:
        raise typer.Exit(1)
