"""What `caption` and `ask` share: loading, decoding options, printing results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from gitcli.cli.common import console, print_out

# as `gitcap fetch --max-pixels` (gitcli.data.images.MAX_PIXELS; a literal here keeps --help free of PIL)
MaxPixelsOpt = Annotated[int, typer.Option(
    "--max-pixels", min=1, help="Refuse images with more pixels (read from the header, before decoding).")]
MAX_PIXELS_DEFAULT = 50_000_000


def run_and_print(images: list[Path], questions: list[str | None], *, checkpoint, preset, device, dtype,
                  quant, precision, batch_size, beams, max_new_tokens, temperature, top_p, seed, cache, compile,
                  as_json, max_pixels: int = MAX_PIXELS_DEFAULT) -> None:
    from gitcli.config import GenerationConfig
    from gitcli.data.images import expand_image_paths
    from gitcli.infer import RuntimeOptions, load_model, run_on_images

    gen = GenerationConfig(max_new_tokens=max_new_tokens, beams=beams, temperature=temperature,
                           top_p=top_p, seed=seed, cache=cache, compile=compile)
    gen.validate()
    paths = expand_image_paths(images)
    if len(questions) == 1 and len(paths) > 1:
        questions = questions * len(paths)
    runtime = RuntimeOptions(device=device, dtype=None if dtype == "auto" else dtype, quant=quant,
                             precision=precision)
    with console.status("loading model"):
        model, _, prec = load_model(checkpoint, preset, runtime)
    if preset is not None:
        console.print(f"[yellow]note:[/] the {preset} preset is untrained here: expect random words")
    several = len(paths) > 1
    failures = 0

    def show(result) -> None:
        nonlocal failures
        if result.error is not None:
            failures += 1
            console.print(f"[bold red]error:[/] {result.error}")
            return
        text = result.generation.text
        if as_json:
            record = {"image": result.image}
            if result.question is not None:
                record.update(question=result.question, answer=text)
            else:
                record["caption"] = text
            print_out(json.dumps(record, ensure_ascii=False))
        else:
            print_out(f"{result.image}\t{text}" if several else text)

    run_on_images(model, prec, paths, questions, gen, batch_size, on_result=show, max_pixels=max_pixels)
    if failures:
        raise typer.Exit(1)
