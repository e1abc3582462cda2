"""Benchmark: gitcap's caption scorer against pycocoevalcap's `COCOEvalCap.evaluate()`.

Generates 5,000 images x 5 references and one result per image (deterministic,
caption-like sentences), scores them with BLEU-1..4, METEOR, ROUGE-L and CIDEr both
ways (SPICE left out of both), checks that every corpus and per-image score is
identical, and prints both wall times and their ratio.

The generated captions use about a hundred words. `--text FILE` takes the sentences
from a text file instead (each image gets 5 consecutive lines as references and the
next as its result), e.g. real captions one per line, for a corpus with a real
vocabulary; gitcap cuts METEOR's paraphrase table to the corpus, so the vocabulary
decides how much of the table its jar loads.

gitcap indexes METEOR's paraphrase table once per machine; the script builds the index
first (and says how long that took) so that the timed runs measure scoring.

    python examples/benchmarks/score_coco_vs_cocoevalcap.py [--images 5000] [--refs 5] [--text FILE]
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
from tests.support.synthetic_captions import synthetic_caption_set  # noqa: E402


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


def _captions_from_text(path: Path, images: int, refs: int) -> tuple[dict[str, str], dict[str, list[str]]]:
    lines = [" ".join(line.split()) for line in path.read_text(errors="replace").splitlines()]
    lines = [line.replace("|", " ") for line in lines if len(line.split()) >= 3]
    per_image = refs + 1
    if len(lines) < per_image:
        raise SystemExit(f"{path} has too few lines of 3 words or more")
    images = min(images, len(lines) // per_image)
    results, references = {}, {}
    for i in range(images):
        chunk = lines[i * per_image : (i + 1) * per_image]
        references[str(i + 1)] = chunk[:refs]
        results[str(i + 1)] = chunk[refs]
    return results, references


def _report_paraphrase_cut(results: dict[str, str], references: dict[str, list[str]]) -> None:
    """Build METEOR's paraphrase index if needed (once per machine), and say how much of
    the table this corpus keeps."""
    import tempfile

    from gitcli.evaluate.paraphrase import ParaphraseIndex, index_ready, meteor_tokens
    from gitcli.evaluate.ptb import tokenize_groups

    if not index_ready():
        t0 = time.perf_counter()
        ParaphraseIndex.open()
        print(f"one-time METEOR paraphrase index build: {time.perf_counter() - t0:.1f} s")
    keys = list(references)
    refs, res = (group.captions for group in tokenize_groups([references[k] for k in keys],
                                                             [[results[k]] for k in keys]))
    index = ParaphraseIndex.open()
    kept = index.kept_entries(meteor_tokens([r[0] for r in res] + [c for caps in refs for c in caps]))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cut.gz"
        index.write_table(kept, out)
        size = out.stat().st_size
    print(f"METEOR paraphrase entries this corpus keeps: {kept.size:,} of {len(index.entries):,} "
          f"({size / 1e6:.2f} MB gzipped vs 61.8 MB)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each; medians are reported")
    parser.add_argument("--text", type=Path, help="take the captions from the lines of this file")
    args = parser.parse_args()

    if args.text:
        results, references = _captions_from_text(args.text, args.images, args.refs)
    else:
        results, references = synthetic_caption_set(args.images, args.refs, seed=args.seed)
    words = {w for caps in references.values() for c in caps for w in c.lower().split()}
    print(f"{len(references)} images x {args.refs} references ({len(words)} distinct words), "
          f"{os.cpu_count()} CPU cores, load average before: {os.getloadavg()[0]:.1f}")
    _report_paraphrase_cut(results, references)

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
