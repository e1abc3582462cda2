"""Benchmark: gitcap's caption scorer against pycocoevalcap's `COCOEvalCap.evaluate()`.

Generates 5,000 images x 5 references and one result per image (deterministic,
caption-like sentences), scores them with BLEU-1..4, METEOR, ROUGE-L and CIDEr both
ways (SPICE left out of both), checks that every corpus and per-image score is
identical, and prints both wall times and their ratio.

    python examples/benchmarks/score_coco_vs_cocoevalcap.py [--images 5000] [--refs 5]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from gitcli.evaluate.captions import DEFAULT_METRICS, evaluate_captions  # noqa: E402
from gitcli.evaluate.synthetic_captions import synthetic_caption_set  # noqa: E402


def cocoevalcap_without_spice(results: dict[str, str], references: dict[str, list[str]]):
    """COCOEvalCap.evaluate() exactly, with Spice removed from its scorer list."""
    from pycocoevalcap import eval as coco_eval
    from pycocotools.coco import COCO

    ids = {k: int(k) for k in references}
    coco = COCO()
    coco.dataset = {
        "images": [{"id": ids[k]} for k in references],
        "annotations": [
            {"id": n, "image_id": ids[k], "caption": c}
            for n, (k, c) in enumerate((k, c) for k, caps in references.items() for c in caps)
        ],
    }
    coco.createIndex()
    coco_res = coco.loadRes([{"image_id": ids[k], "caption": results[k]} for k in references])

    evaluator = coco_eval.COCOEvalCap(coco, coco_res)
    original = coco_eval.Spice
    # COCOEvalCap builds its scorer list inside evaluate(): swap Spice for a scorer that
    # costs nothing, and drop its entry afterwards.
    coco_eval.Spice = _NullSpice
    try:
        evaluator.evaluate()
    finally:
        coco_eval.Spice = original
    evaluator.eval.pop("SPICE", None)
    for per in evaluator.imgToEval.values():
        per.pop("SPICE", None)
    return evaluator


class _NullSpice:
    """Stands in for Spice: costs nothing and records nothing the benchmark compares."""

    def compute_score(self, gts, res):
        return 0.0, [0.0] * len(gts)

    def method(self):
        return "SPICE"


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (the jars, the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; medians are reported")
    args = parser.parse_args()

    results, references = synthetic_caption_set(args.images, args.refs, seed=args.seed)
    print(f"{args.images} images x {args.refs} references, {os.cpu_count()} CPU cores, "
          f"load average before: {os.getloadavg()[0]:.1f}")

    # Interleaved (A, B, A, B, ...) so that load from other processes hits both alike.
    coco_times, our_times, coco_cpu, our_cpu = [], [], [], []
    for _ in range(args.repeat):
        c0, t0 = _cpu_seconds(), time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            coco = cocoevalcap_without_spice(results, references)  # it prints as it goes
        coco_times.append(time.perf_counter() - t0)
        coco_cpu.append(_cpu_seconds() - c0)
        c0, t0 = _cpu_seconds(), time.perf_counter()
        ours = evaluate_captions(results, references, DEFAULT_METRICS)
        our_times.append(time.perf_counter() - t0)
        our_cpu.append(_cpu_seconds() - c0)
        print(f"  run {len(our_times)}: COCOEvalCap {coco_times[-1]:6.2f} s ({coco_cpu[-1]:5.1f} CPU-s)   "
              f"gitcap {our_times[-1]:6.2f} s ({our_cpu[-1]:5.1f} CPU-s)   "
              f"ratio {our_times[-1] / coco_times[-1]:.3f}   load average {os.getloadavg()[0]:.1f}")
    t_coco, t_ours = statistics.median(coco_times), statistics.median(our_times)

    mismatches = [m for m in DEFAULT_METRICS if coco.eval[m] != ours.scores[m]]
    for k in references:
        for m in DEFAULT_METRICS:
            if coco.imgToEval[int(k)][m] != ours.per_image[k][m]:
                mismatches.append(f"{m} of image {k}")
    print(f"{'metric':10} {'COCOEvalCap':>22} {'gitcap':>22}")
    for m in DEFAULT_METRICS:
        print(f"{m:10} {float(coco.eval[m])!r:>22} {ours.scores[m]!r:>22}")
    print(f"COCOEvalCap.evaluate() (median of {args.repeat}): {t_coco:6.2f} s")
    print(f"gitcap evaluate_captions (median of {args.repeat}): {t_ours:4.2f} s")
    print(f"ratio gitcap / COCOEvalCap: {t_ours / t_coco:.3f} (median of per-run ratios "
          f"{statistics.median(o / c for o, c in zip(our_times, coco_times)):.3f}, best {min(o / c for o, c in zip(our_times, coco_times)):.3f})")
    print(f"CPU seconds (median): COCOEvalCap {statistics.median(coco_cpu):.1f}, gitcap {statistics.median(our_cpu):.1f}")
    if mismatches:
        print(f"NOT IDENTICAL: {len(mismatches)} differences, e.g. {mismatches[:5]}")
        return 1
    print("scores identical (corpus and per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
