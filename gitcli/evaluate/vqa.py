"""VQA accuracy exactly as the official evaluation computes it (GT-Vision-Lab/VQA,
PythonEvaluationTools/vqaEvaluation/vqaEval.py), plus a plain exact-match accuracy.

The official rules, quirks included, because published numbers depend on them:
- newlines/tabs become spaces and both ends are stripped, for prediction and humans;
- only when the human answers are not all identical are the human answers *and* the
  prediction normalised (punctuation, number words, articles, contractions). With
  unanimous humans "2", the prediction "Two" scores 0;
- for each of the (usually 10) human answers, leave that one out and score
  min(#other humans giving exactly the prediction / 3, 1); average over the subsets.
  "Leaving one out" drops every answer dict equal to it, as the original does;
- results are percentages rounded to 2 decimals: per question, overall, per answer
  type and per question type (each the mean of the unrounded per-question accuracies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from gitcli.errors import GitcapError
from gitcli.evaluate.normalize import clean_whitespace, normalize_answer, process_digit_article, process_punctuation


@dataclass
class VqaAccuracy:
    """Percentages (0-100), rounded to `decimals` as the official code does."""

    overall: float
    per_answer_type: dict[str, float]
    per_question_type: dict[str, float]
    per_question: dict[int, float]
    questions: int


def question_accuracy(prediction: str, human_answers: Sequence[Mapping[str, Any]]) -> float:
    """Unrounded accuracy in [0, 1] of one prediction against the human answer dicts."""
    humans = [dict(a, answer=clean_whitespace(a["answer"])) for a in human_answers]
    prediction = clean_whitespace(prediction)
    if len({a["answer"] for a in humans}) > 1:
        for a in humans:
            a["answer"] = process_digit_article(process_punctuation(a["answer"]))
        prediction = process_digit_article(process_punctuation(prediction))
    subset_scores = []
    for left_out in humans:
        others = [a for a in humans if a != left_out]
        matches = sum(1 for a in others if a["answer"] == prediction)
        subset_scores.append(min(1.0, matches / 3))
    return sum(subset_scores) / len(subset_scores)


def vqa_accuracy(
    predictions: Mapping[int, str], annotations: Mapping[int, Mapping[str, Any]], *, decimals: int = 2
) -> VqaAccuracy:
    """Official VQA accuracy of `predictions` ({question_id: answer}).

    `annotations` is `{question_id: annotation}` as read by
    `gitcli.formats.coco.read_vqa_annotations`. Every predicted question must have an
    annotation. Questions are taken in the annotations' order, as the official code
    does: float sums depend on their order, and a mean that lands on a rounding tie
    would otherwise print 0.01 off.
    """
    if not predictions:
        raise GitcapError("nothing to score: no predictions")
    unknown = [q for q in predictions if q not in annotations]
    if unknown:
        raise GitcapError(f"{len(unknown)} predicted questions have no annotation (e.g. question_id {unknown[0]})")
    per_question_raw: dict[int, float] = {}
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for qid, ann in annotations.items():
        if qid not in predictions:
            continue
        acc = question_accuracy(predictions[qid], ann["answers"])
        per_question_raw[qid] = acc
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)

    def pct(values: Sequence[float]) -> float:
        return round(100 * float(sum(values)) / len(values), decimals)

    return VqaAccuracy(
        overall=pct(list(per_question_raw.values())),
        per_answer_type={t: pct(v) for t, v in by_atype.items()},
        per_question_type={t: pct(v) for t, v in by_qtype.items()},
        per_question={q: round(100 * a, decimals) for q, a in per_question_raw.items()},
        questions=len(per_question_raw),
    )


def exact_match_accuracy(predictions: Sequence[str], answers: Sequence[str | Sequence[str]]) -> float:
    """Fraction (0-1) of predictions equal to their answer after official normalisation.

    `answers[i]` is one reference answer or a list of acceptable ones. A cheap metric
    for training-time validation on synthetic or single-answer data.
    """
    if len(predictions) != len(answers):
        raise GitcapError(f"{len(predictions)} predictions but {len(answers)} answers")
    if not predictions:
        raise GitcapError("nothing to score: no predictions")
    hits = 0
    for pred, ref in zip(predictions, answers):
        accepted = [ref] if isinstance(ref, str) else list(ref)
        hits += normalize_answer(pred) in {normalize_answer(a) for a in accepted}
    return hits / len(predictions)
