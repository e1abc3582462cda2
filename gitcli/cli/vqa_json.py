"""`gitcap vqa-json`: a VQA result TSV -> the EvalAI VQAv2 submission JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import console, output_file, user_errors


@user_errors
def vqa_json(
    results: Annotated[Path, typer.Option("--results", "-r", help="VQA results: gitcap's keyed result TSV, GIT's one-column TSV, or a JSON list.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Submission JSON to write.")],
    questions: Annotated[Optional[Path], typer.Option("--questions", "-q", help="Official questions JSON: check completeness, fill missing answers with \"\".")] = None,
) -> None:
    """Write the EvalAI VQAv2 submission [{"question_id": int, "answer": str}], answers normalised officially.

    Example:

        gitcap vqa-json --results vqa.tsv --questions v2_OpenEnded_mscoco_test2015_questions.json --out submission.json
    """
    from gitcli.evaluate.vqa_results import build_submission
    from gitcli.formats.coco import write_vqa_submission

    output_file(out)
    sub = build_submission(results, questions)
    write_vqa_submission(out, sub.answers)
    if sub.filled:
        console.print(f"[yellow]{sub.filled} questions had no result and were answered \"\"[/]")
    console.print(f"wrote {len(sub.answers)} answers to {out}")
