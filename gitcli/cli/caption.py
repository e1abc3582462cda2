"""`gitcap caption`: caption images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from gitcli.cli.common import (BatchSizeOpt, BeamsOpt, CacheOpt, CheckpointOpt, DecodeCompileOpt, DeviceOpt, DtypeOpt,
                               JsonOpt, MaxNewTokensOpt, PrecisionOpt, PresetOpt, QuantOverrideOpt, SeedOpt,
                               TemperatureOpt, TopPOpt, user_errors)
from gitcli.cli.image_commands import MAX_PIXELS_DEFAULT, MaxPixelsOpt


@user_errors
def caption(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders of images.", show_default=False)],
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    beams: BeamsOpt = 1,
    max_new_tokens: MaxNewTokensOpt = 20,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    cache: CacheOpt = "dynamic",
    compile: DecodeCompileOpt = False,
    batch_size: BatchSizeOpt = 16,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOverrideOpt = None,
    precision: PrecisionOpt = None,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    max_pixels: MaxPixelsOpt = MAX_PIXELS_DEFAULT,
) -> None:
    """Caption images: one line per image (path<TAB>caption when there are several).

    Example: gitcap caption photos/ --checkpoint runs/coco --beams 3
    """
    from gitcli.cli.image_commands import run_and_print

    run_and_print(images, [None], checkpoint=checkpoint, preset=preset, device=device, dtype=dtype,
                  quant=quant, precision=precision, batch_size=batch_size, beams=beams, max_new_tokens=max_new_tokens,
                  temperature=temperature, top_p=top_p, seed=seed, cache=cache, compile=compile,
                  as_json=json_out, max_pixels=max_pixels)
