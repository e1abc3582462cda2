"""Turning VQA results into an EvalAI submission, and reading them for scoring."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gitcli.errors import GitcapError
from gitcli.evaluate.normalize import normalize_answer
from gitcli.formats.coco import read_vqa_questions, read_vqa_submission
from gitcli.formats.tsv import read_vqa_result_tsv


def read_vqa_results(path: Path) -> list[dict[str, Any]]:
    """A VQA result TSV (keyed or GIT's one-column form) or a submission JSON."""
    path = Path(path)
    return read_vqa_submission(path) if path.suffix.lower() == ".json" else read_vqa_result_tsv(path)


def answers_by_question(items: list[dict[str, Any]], *, source: Path) -> dict[int, str]:
    """{question_id: answer}, refusing a question answered twice."""
    out: dict[int, str] = {}
    for item in items:
        qid = item["question_id"]
        if qid in out:
            raise GitcapError(f"{source}: question_id {qid} is answered twice")
        out[qid] = item["answer"]
    return out


@dataclass
class Submission:
    answers: list[dict[str, Any]]
    filled: int = 0  # questions of --questions without a result, answered ""
    unknown: int = 0  # results whose question is not in --questions (kept out)


def build_submission(results: Path, questions: Path | None = None) -> Submission:
    """`[{"question_id": int, "answer": normalised str}]`, one per question.

    With the official questions file, the submission follows its order, every question
    is present (missing ones answered "" and counted) and results for questions outside
    it are an error: EvalAI rejects such a file.
    """
    answers = answers_by_question(read_vqa_results(results), source=results)
    normalised = {qid: normalize_answer(a) for qid, a in answers.items()}
    if questions is None:
        return Submission([{"question_id": q, "answer": a} for q, a in normalised.items()])
    qids = [q["question_id"] for q in read_vqa_questions(questions)]
    known = set(qids)
    unknown = [q for q in normalised if q not in known]
    if unknown:
        raise GitcapError(
            f"{len(unknown)} results answer questions not in {questions} (e.g. question_id {unknown[0]}); "
            "is this the right split?"
        )
    filled = sum(1 for q in qids if q not in normalised)
    return Submission([{"question_id": q, "answer": normalised.get(q, "")} for q in qids], filled=filled)
