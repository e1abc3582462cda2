"""COCO caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE) through pycocoevalcap.

The scores are pycocoevalcap's own: the same tokenizer command, the same scorer
classes on the same dicts in the same order, so every number equals what
`COCOEvalCap.evaluate()` prints. What differs is the schedule:

- the PTB tokenizer jar is launched once for references and results (not twice);
- BLEU, ROUGE-L and CIDEr run in worker processes while METEOR's jars run, instead of
  one after another. CIDEr stays one job because its idf is computed over the whole
  reference set: splitting the corpus would change the scores;
- METEOR's jar loads its paraphrase table cut down to the entries this corpus can
  use (`gitcli.evaluate.paraphrase`), not all 5.3 million of them;
- METEOR's per-image statistics can be computed by several jars and aggregated by one
  `EVAL` call (see `gitcli.evaluate.meteor`).

Inputs are keyed by image key (a string); images are scored in the references' order,
which is the order `COCOEvalCap` uses (the annotation file's image order).
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from gitcli.errors import GitcapError

if TYPE_CHECKING:
    from gitcli.evaluate.ptb import Tokenized

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
# The order COCOEvalCap reports them in.
ALL_METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
DEFAULT_METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr")

# Names people type for a metric -> the metric names it stands for.
_ALIASES = {
    "bleu": BLEU,
    **{m.lower(): (m,) for m in ALL_METRICS},
    **{f"bleu{i}": (f"Bleu_{i}",) for i in range(1, 5)},
    **{f"bleu-{i}": (f"Bleu_{i}",) for i in range(1, 5)},
    "rouge": ("ROUGE_L",),
    "rouge-l": ("ROUGE_L",),
    "rougel": ("ROUGE_L",),
}


def resolve_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """`("bleu", "cider")` -> `("Bleu_1", ..., "Bleu_4", "CIDEr")`, in COCOEvalCap's order."""
    chosen: set[str] = set()
    for name in metrics:
        names = _ALIASES.get(name.strip().lower())
        if names is None:
            raise GitcapError(f"unknown caption metric {name!r}; choose from BLEU, {', '.join(ALL_METRICS)}")
        chosen.update(names)
    if not chosen:
        raise GitcapError("no caption metric chosen")
    return tuple(m for m in ALL_METRICS if m in chosen)


@dataclass
class CaptionScores:
    """Corpus scores and per-image scores, keyed by metric name (COCOEvalCap's names)."""

    scores: dict[str, float]
    per_image: dict[str, dict[str, float]] = field(default_factory=dict)
    # What the user should know about the scores (one line each), e.g. captions that
    # pycocoevalcap's tokenizer pairs with another caption's tokens.
    warnings: list[str] = field(default_factory=list)


# ---- the pure-Python scorers, run in worker processes ----------------------------------
def _lower_priority() -> None:
    """Worker-process initializer: METEOR's jar is the critical path; let it win the CPU."""
    try:
        os.nice(5)
    except (AttributeError, OSError):  # not on this platform, or not allowed
        pass


def _python_scorer(name: str, gts: dict, res: dict) -> tuple[object, object]:
    """Run one pycocoevalcap scorer exactly as COCOEvalCap calls it."""
    if name == "Bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4).compute_score(gts, res, verbose=0)
    if name == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge().compute_score(gts, res)
    if name == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return Cider().compute_score(gts, res)
    raise ValueError(name)


def _check_inputs(results: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> list[str]:
    if not references:
        raise GitcapError("nothing to score: no reference captions")
    missing = [k for k in references if k not in results]
    extra = [k for k in results if k not in references]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} labelled images have no result (e.g. {missing[0]!r})")
        if extra:
            parts.append(f"{len(extra)} results have no labels (e.g. {extra[0]!r})")
        raise GitcapError("; ".join(parts))
    keys = list(references)
    for k in keys:
        if not isinstance(results[k], str):
            raise GitcapError(f"the result for {k!r} is not a string")
        refs = references[k]
        if isinstance(refs, str) or not refs:
            raise GitcapError(f"image {k!r} needs a non-empty list of reference captions")
    return keys


def evaluate_captions(
    results: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = DEFAULT_METRICS,
    *,
    workers: int | None = None,
    on_step: Callable[[str], None] | None = None,
) -> CaptionScores:
    """Score one result caption per image against its references, as COCOEvalCap does.

    `results` maps image key -> caption, `references` image key -> list of captions;
    both must hold the same keys (see `gitcli.evaluate.align.align_keys` to score an
    intersection). `workers` bounds the processes (default: the CPU count); `on_step`
    is told the name of each stage as it starts and ends ("tokenize", "METEOR", ...).
    """
    metrics = resolve_metrics(metrics)
    keys = _check_inputs(results, references)
    step = on_step or (lambda _name: None)
    workers = max(1, workers or os.cpu_count() or 1)

    from gitcli.evaluate.meteor import MeteorScorer, jars_for
    from gitcli.evaluate.ptb import tokenize_groups

    if "SPICE" in metrics:
        from gitcli.evaluate.spice import ensure_corenlp

        ensure_corenlp()  # fail before minutes of other scoring, not after

    meteor = None
    pool = None
    raw: dict[str, tuple[object, object]] = {}
    try:
        step("tokenize")
        tokenized = tokenize_groups([list(references[k]) for k in keys], [[results[k]] for k in keys])
        ref_tok, res_tok = (group.captions for group in tokenized)
        gts = dict(zip(keys, ref_tok))
        res = dict(zip(keys, res_tok))
        if "CIDEr" in metrics and not any(t for caps in ref_tok for t in caps):
            # pycocoevalcap's CIDEr ends in `max() arg is an empty sequence` here.
            raise GitcapError("CIDEr needs words: no reference caption has any left after tokenization")
        step("tokenize done")

        # One pycocoevalcap scorer per job; CIDEr, the slowest, is submitted first.
        wanted = {"CIDEr": "CIDEr" in metrics, "Bleu": any(m in BLEU for m in metrics), "ROUGE_L": "ROUGE_L" in metrics}
        jobs = [job for job, on in wanted.items() if on]
        futures: dict[str, Future] = {}
        with_meteor = "METEOR" in metrics
        if jobs:
            # With METEOR running, leave it a core.
            pool = ProcessPoolExecutor(
                max_workers=max(1, min(len(jobs), workers - with_meteor)),
                initializer=_lower_priority if with_meteor else None,
            )
            for job in jobs:
                futures[job] = pool.submit(_python_scorer, job, gts, res)
        if with_meteor:
            # Extra jars only where cores are spare beyond METEOR's and the Python
            # scorers' (so one jar on a 2-core machine).
            from gitcli.evaluate.paraphrase import index_ready

            step("METEOR" if index_ready() else "METEOR (indexing its paraphrase table, once per machine: 15-30 s)")
            hypotheses, refs = [res[k][0] for k in keys], [gts[k] for k in keys]
            meteor = MeteorScorer(jars_for(len(keys), free_cores=workers - 2), hypotheses, refs)
            raw["METEOR"] = meteor.score(hypotheses, refs)
            step("METEOR done")
        for job, fut in futures.items():
            raw[job] = fut.result()
            step(f"{job} done")
        if "SPICE" in metrics:
            from gitcli.evaluate.spice import spice_score

            step("SPICE")
            raw["SPICE"] = spice_score(gts, res)
            step("SPICE done")
    finally:
        if meteor is not None:
            meteor.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    scored = _collect(keys, metrics, raw)
    scored.warnings.extend(_line_break_warnings(*tokenized))
    return scored


def _line_break_warnings(references: Tokenized, results: Tokenized) -> list[str]:
    warnings = []
    for side, group in (("reference", references), ("result", results)):
        if group.extra_lines:
            warnings.append(
                f"the PTB tokenizer read {group.extra_lines} line breaks inside the {side} captions (\\r, \\v, "
                r"\f, U+2028 or U+2029): like COCOEvalCap, the scores pair the later "
                f"{side} captions with their neighbours' tokens; replace those characters to score the text as meant"
            )
    return warnings


def _collect(keys: list[str], metrics: tuple[str, ...], raw: dict[str, tuple[object, object]]) -> CaptionScores:
    scores: dict[str, float] = {}
    per_image: dict[str, dict[str, float]] = {k: {} for k in keys}

    def put(metric: str, score: object, per: object) -> None:
        scores[metric] = float(score)  # type: ignore[arg-type]
        for k, s in zip(keys, per):  # type: ignore[call-overload]
            per_image[k][metric] = float(s)

    if "Bleu" in raw:
        score, per = raw["Bleu"]
        for i, metric in enumerate(BLEU):
            if metric in metrics:
                put(metric, score[i], per[i])  # type: ignore[index]
    for metric in ("METEOR", "ROUGE_L", "CIDEr", "SPICE"):
        if metric in raw:
            put(metric, *raw[metric])
    return CaptionScores(scores={m: scores[m] for m in metrics}, per_image=per_image)


def score_captions(
    results: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    metrics: Sequence[str] = ("CIDEr",),
    *,
    workers: int | None = None,
) -> dict[str, float]:
    """Corpus scores only, e.g. `{"CIDEr": 0.93}` (COCOEvalCap's scale, not x100).

    The call training validation makes; a few hundred images take a few seconds, most
    of it the Java tokenizer's start-up.
    """
    return evaluate_captions(results, references, metrics, workers=workers).scores
