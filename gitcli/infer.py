"""Inference over images: load a model, batch images through the decoder, report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from gitcli.config import GenerationConfig
from gitcli.data.images import MAX_PIXELS, open_rgb
from gitcli.dist import resolve_device, resolve_precision
from gitcli.errors import GitcapError
from gitcli.generate import Generation, generate_for_images


@dataclass
class RuntimeOptions:
    """Where and how a loaded model runs."""

    device: str = "auto"
    dtype: str | None = None  # override the checkpoint's storage dtype
    quant: str | None = None  # override how the checkpoint's LM is quantised (gitcli.model.quant)
    precision: str | None = None


def load_model(checkpoint: Path | None, preset: str | None, runtime: RuntimeOptions):
    """A checkpoint, or a freshly built (untrained) preset. Returns (captioner, device, precision)."""
    from gitcli.model.checkpoint import load_checkpoint

    device = resolve_device(runtime.device)
    precision = resolve_precision(runtime.precision, device)
    if checkpoint is not None and preset is not None:
        raise GitcapError("give either --checkpoint or --preset, not both")
    if checkpoint is not None:
        model = load_checkpoint(checkpoint, device=device, dtype=runtime.dtype, quant=runtime.quant)
    elif preset == "tiny":
        from gitcli.model.captioner import build_captioner
        from gitcli.model.tiny import tiny_model_config

        torch.manual_seed(0)
        model = build_captioner(tiny_model_config(dtype=runtime.dtype or "auto", quant=runtime.quant or "none"),
                                device=device)
    elif preset is not None:
        raise GitcapError(f"unknown preset {preset!r}; the built-in preset is: tiny")
    else:
        raise GitcapError("no model: pass --checkpoint DIR (or --preset tiny for an untrained tiny model)")
    model.eval()
    return model, device, precision


@dataclass
class ImageResult:
    image: str
    question: str | None
    generation: Generation | None
    error: str | None = None


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@torch.no_grad()
def run_on_images(model, precision: str, images: list[Path],
                  questions: list[str | None], gen: GenerationConfig, batch_size: int,
                  on_result: Callable[[ImageResult], None] | None = None,
                  max_pixels: int = MAX_PIXELS) -> list[ImageResult]:
    """Decode images (with their question, or None for a caption) in batches, on the
    model's device.

    A file that cannot be read is reported in its result and skipped; the rest still run.
    """
    gen.validate()
    transform = model.image_transform()
    results: list[ImageResult] = []
    for chunk in _batches(list(zip(images, questions)), batch_size):
        tensors, kept = [], []
        for path, question in chunk:
            try:
                tensors.append(transform(open_rgb(path, max_pixels=max_pixels)))
                kept.append((path, question))
            except GitcapError as exc:
                result = ImageResult(str(path), question, None, str(exc))
                results.append(result)
                if on_result:
                    on_result(result)
        if not kept:
            continue
        outs = generate_for_images(model, torch.stack(tensors), [q for _, q in kept], gen, precision=precision)
        for (path, question), out in zip(kept, outs):
            result = ImageResult(str(path), question, out)
            results.append(result)
            if on_result:
                on_result(result)
    return results
