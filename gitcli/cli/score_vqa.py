"""`gitcap score-vqa`: the official VQA accuracy on a split with answers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import console, out_console, output_file, user_errors


@user_errors
def score_vqa(
    results: Annotated[Path, typer.Option("--results", "-r", help="VQA results: result TSV or submission JSON.")],
    annotations: Annotated[Path, typer.Option("--annotations", "-a", help="Official annotations JSON (e.g. v2_mscoco_val2014_annotations.json).")],
    questions: Annotated[Optional[Path], typer.Option("--questions", "-q", help="Official questions JSON: every question must be answered.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Write the accuracies (and per question) to this JSON file.")] = None,
    allow_missing: Annotated[bool, typer.Option("--allow-missing", help="Score only the answered questions and report how many were not.")] = False,
) -> None:
    """VQA accuracy exactly as the official vqaEval.py computes it: overall, per answer type, per question type.

    Example:

        gitcap score-vqa --results vqa.tsv --annotations v2_mscoco_val2014_annotations.json --questions v2_OpenEnded_mscoco_val2014_questions.json
    """
    from rich.table import Table

    from gitcli.config import write_json
    from gitcli.errors import GitcapError
    from gitcli.evaluate.vqa import vqa_accuracy
    from gitcli.evaluate.vqa_results import answers_by_question, read_vqa_results
    from gitcli.formats.coco import read_vqa_annotations, read_vqa_questions

    if out is not None:
        output_file(out)
    preds = answers_by_question(read_vqa_results(results), source=results)
    anns = read_vqa_annotations(annotations)
    expected = [q["question_id"] for q in read_vqa_questions(questions)] if questions else list(anns)
    missing_ann = [q for q in expected if q not in anns]
    if missing_ann:
        raise GitcapError(f"{len(missing_ann)} questions have no annotation in {annotations} (e.g. {missing_ann[0]})")
    unknown = [q for q in preds if q not in anns]
    if unknown:
        raise GitcapError(f"{len(unknown)} results answer questions not in {annotations} (e.g. question_id {unknown[0]})")
    unanswered = [q for q in expected if q not in preds]
    if unanswered and not allow_missing:
        raise GitcapError(
            f"{len(unanswered)} of {len(expected)} questions have no result (e.g. question_id {unanswered[0]}); "
            "pass --allow-missing to score the answered ones"
        )
    if unanswered:
        console.print(f"[yellow]scoring {len(preds)} answered questions; {len(unanswered)} have no result[/]")
    acc = vqa_accuracy(preds, anns)

    table = Table(title=f"VQA accuracy — {acc.questions} questions")
    table.add_column("group")
    table.add_column("accuracy", justify="right")
    table.add_row("[bold]overall[/]", f"[bold]{acc.overall:.2f}[/]")
    for name, value in sorted(acc.per_answer_type.items()):
        table.add_row(f"answer type: {name}", f"{value:.2f}")
    for name, value in sorted(acc.per_question_type.items()):
        table.add_row(f"question type: {name}", f"{value:.2f}")
    out_console.print(table)
    if out is not None:
        write_json(
            out,
            {
                "overall": acc.overall,
                "perAnswerType": acc.per_answer_type,
                "perQuestionType": acc.per_question_type,
                "questions": acc.questions,
                "unanswered": len(unanswered),
                "inputs": {"results": str(results), "annotations": str(annotations), "questions": str(questions) if questions else None},
                "perQuestion": {str(q): a for q, a in acc.per_question.items()},
            },
        )
        console.print(f"wrote {out}")
