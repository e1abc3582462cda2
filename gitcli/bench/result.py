"""The numbers a benchmark reports, derived the same way for training and decoding."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from gitcli.bench.measure import median


@dataclass
class BenchResult:
    kind: str  # train | generate
    unit: str  # what one item is: a training sample, a decoded image
    batch_size: int
    items_per_s: float  # batch / median seconds per batch
    tokens_per_item: int  # caption tokens trained on / new tokens decoded per image
    tokens_per_s: float  # items_per_s * tokens_per_item
    median_batch_seconds: float
    batch_seconds: list[float]
    flops_per_item: float  # model FLOPs (gitcli.bench.flops)
    flops_parts: dict  # forward FLOPs per item: vision, mapping, lm (+ LM parameters)
    achieved_tflops: float
    peak_tflops: float | None
    mfu: float | None  # achieved / peak, 0..1; None where the peak is unknown
    peak_memory_bytes: int | None
    # train: `gitcap train --dry-run`'s estimate; generate: weights as stored + KV cache + logits
    memory_estimate_bytes: int | None
    trainable_parameters: int
    frozen_parameters: int
    prefix_length: int
    precision: str
    device: str
    last_loss: float | None = None  # training: the last step's loss, a sanity check
    profile: dict | None = None  # --profile: wall and busy ms per iteration, the costliest operators

    def to_dict(self) -> dict:
        return asdict(self)


def summarise(*, kind: str, unit: str, batch: int, times: list[float], tokens_per_item: int, flops_per_item: float,
              peak_flops: float | None, **rest) -> BenchResult:
    seconds = median(times)
    items_per_s = batch / seconds
    achieved = flops_per_item * items_per_s
    for name, value in (("seconds per batch", seconds), ("FLOPs per item", flops_per_item)):
        if not (math.isfinite(value) and value > 0):
            raise RuntimeError(f"benchmark produced a non-positive {name}: {value}")
    return BenchResult(
        kind=kind, unit=unit, batch_size=batch, items_per_s=items_per_s, tokens_per_item=tokens_per_item,
        tokens_per_s=items_per_s * tokens_per_item, median_batch_seconds=seconds, batch_seconds=times,
        flops_per_item=flops_per_item, achieved_tflops=achieved / 1e12,
        peak_tflops=peak_flops / 1e12 if peak_flops else None,
        mfu=achieved / peak_flops if peak_flops else None, **rest)


def report(command: str, cfg, result: BenchResult) -> dict:
    """Everything a README performance row needs: numbers, exact options, versions, device, date."""
    import torch

    from gitcli.bench.measure import environment

    return {"command": command, "options": asdict(cfg), "result": result.to_dict(),
            "environment": environment(torch.device(result.device))}
