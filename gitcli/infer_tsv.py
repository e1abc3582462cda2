"""Batched inference over GIT TSVs: an image TSV, optionally an aligned question TSV.

Output: a result TSV in input order (`key<TAB>[{"caption": ...}]`, or for questions
`key<TAB>[{"question_id": N, "answer": ...}, ...]`) with both line indexes, and
optionally COCO results JSON.

Resumable: each process appends finished rows to its own `OUT.partial-R.tsv` as
`row<TAB>key<TAB>cell`, flushed per batch; a rerun (with any number of processes) skips
every row found in those files or in an existing output, then the rows are merged in input
order into OUT, atomically, and the partial files removed. A rerun resumes only when
`OUT.provenance.json` (model, decoding options, inputs: gitcli.infer_provenance) says the
rows came from what it is given now; otherwise it is refused, or `overwrite` starts over. A row whose image cannot be
decoded fails alone: it is reported and counted, written nowhere, and tried again by the
next run.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gitcli.config import GenerationConfig
from gitcli.data.images import MAX_PIXELS, open_rgb
from gitcli.dist import all_reduce_mean, barrier, init_distributed
from gitcli.errors import GitcapError
from gitcli.formats.coco import write_coco_results, write_vqa_submission
from gitcli.formats.lock import OutputLock, lock_for_file
from gitcli.formats.tsv import TsvFile, decode_image, iter_tsv, lineidx8b_path, lineidx_path, read_question_tsv, write_tsv
from gitcli.generate import generate_for_images
from gitcli.infer_provenance import check_provenance, describe_run, provenance_path, write_provenance
from gitcli.progress import ProgressBar


@dataclass
class TsvInferenceReport:
    rows: int = 0  # rows in the image TSV
    skipped: int = 0  # already done by an earlier run
    written: int = 0  # done now (this process)
    failed: list[tuple[int, str, str]] = field(default_factory=list)  # (row, key, reason)
    outputs: int = 0  # captions or answers produced now
    merged: bool = False


def _partial(out: Path, rank: int) -> Path:
    return out.with_name(f"{out.name}.partial-{rank}.tsv")


def _read_partials(out: Path) -> dict[int, tuple[str, str]]:
    """Rows finished by earlier runs: {row: (key, cell)}; a torn last line is ignored."""
    done: dict[int, tuple[str, str]] = {}
    for part in sorted(out.parent.glob(f"{out.name}.partial-*.tsv")):
        with open(part, "rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # the process died while writing this line
                row, key, cell = raw.decode("utf-8").rstrip("\n").split("\t", 2)
                done[int(row)] = (key, cell)
    return done


def _finished_rows(out: Path, keys: list[str]) -> dict[int, tuple[str, str]]:
    """Rows done by earlier runs: in partial files, or in an output a finished run wrote
    (which may still lack rows that failed then)."""
    done = _read_partials(out)
    if out.exists():
        row_of = {k: i for i, k in enumerate(keys)}
        for cells in iter_tsv(out):
            if len(cells) == 2 and cells[0] in row_of:
                done.setdefault(row_of[cells[0]], (cells[0], cells[1]))
    return done


def _claim(out: Path, record: dict, *, rank: int, overwrite: bool, device: torch.device) -> None:
    """Refuse rows from other inputs; record ours when nothing is recorded yet.

    Every rank reaches the same verdict from the same files, and they agree on it before
    any of them stops: a rank that raised alone would leave the others in a collective,
    to die there with a traceback.
    """
    if rank == 0 and overwrite:  # before any rank reads the rows it discards
        _discard(out)
    barrier()
    has_rows = out.exists() or any(p.stat().st_size for p in out.parent.glob(f"{out.name}.partial-*.tsv"))
    refusal = None
    try:
        check_provenance(out, record, has_rows=has_rows)
    except GitcapError as exc:
        refusal = exc
    if all_reduce_mean(float(refusal is not None), device) > 0:
        raise refusal or GitcapError(f"another rank refused to add rows to {out}; see its message")
    if not provenance_path(out).exists():  # rank 0 first under torchrun; the same record from any rank
        write_provenance(out, record)
    barrier()


def _discard(out: Path) -> None:
    """--overwrite: the output, its indexes, the partial rows and their record go."""
    for path in (out, lineidx_path(out), lineidx8b_path(out), provenance_path(out),
                 *out.parent.glob(f"{out.name}.partial-*.tsv")):
        path.unlink(missing_ok=True)


def _drop_torn_line(path: Path) -> None:
    """Cut a partial file back to its last complete line before appending to it."""
    if not path.exists():
        return
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        with open(path, "r+b") as fh:
            fh.truncate(keep)


def output_lock(out: Path, rank: int | None = None) -> OutputLock:
    """One writer per (output, rank). The ranks of one torchrun job share `out` by design,
    each under its own lock; a second job or process aimed at it is refused at once, in
    one line naming the first one's pid. `rank` defaults to the one torchrun gave this
    process, so the lock can be taken before the model loads."""
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    return OutputLock(lock_for_file(out.with_name(f"{out.name}.rank-{rank}")), what=f"--out {out}",
                      hint="wait for it to finish, or choose another --out")


def infer_tsv(model, device: torch.device, precision: str, images: Path, out: Path, gen: GenerationConfig, *,
              questions: Path | None = None, batch_size: int = 32, coco_json: Path | None = None,
              rank: int | None = None, world: int | None = None, progress: bool = False,
              overwrite: bool = False, lock: bool = True, max_pixels: int = MAX_PIXELS) -> TsvInferenceReport:
    """Decode every row of `images` that no earlier run finished into `out`.

    `rank`/`world` default to this process's place in the torchrun job (one process: 0/1).
    `progress` shows the rows of this process (rank 0's only) on stderr. `overwrite`
    discards what earlier runs wrote to `out` instead of resuming them. `lock=False`: the
    caller already holds `output_lock(out, rank)`.
    """
    gen.validate()
    if rank is None or world is None:
        rank, world = init_distributed(device.type)
    with output_lock(out, rank) if lock else contextlib.nullcontext():
        return _infer_tsv(model, device, precision, Path(images), Path(out), gen, questions=questions,
                          batch_size=batch_size, coco_json=coco_json, rank=rank, world=world, progress=progress,
                          overwrite=overwrite, max_pixels=max_pixels)


def _infer_tsv(model, device: torch.device, precision: str, images: Path, out: Path, gen: GenerationConfig, *,
               questions: Path | None, batch_size: int, coco_json: Path | None, rank: int, world: int,
               progress: bool, overwrite: bool, max_pixels: int) -> TsvInferenceReport:
    out.parent.mkdir(parents=True, exist_ok=True)
    with TsvFile(images) as tsv:
        keys = tsv.keys()
        if len(set(keys)) != len(keys):
            raise GitcapError(f"{images} has repeated keys; every image row needs its own key")
        question_rows = read_question_tsv(questions, keys) if questions is not None else None
        report = TsvInferenceReport(rows=len(keys))

        _claim(out, describe_run(model, precision, gen, images, keys, questions), rank=rank, overwrite=overwrite,
               device=device)

        done = _finished_rows(out, keys)
        todo = [r for r in range(len(keys)) if r % world == rank and r not in done]
        report.skipped = sum(1 for r in done if r % world == rank)

        transform = model.image_transform()
        _drop_torn_line(_partial(out, rank))
        bar = ProgressBar("infer-tsv", report.skipped + len(todo), unit="rows", enabled=progress and rank == 0)
        bar.show(report.skipped)
        with bar, open(_partial(out, rank), "a", encoding="utf-8") as part:
            for start in range(0, len(todo), batch_size):
                rows = todo[start:start + batch_size]
                results: dict[int, list[dict]] = {}
                pixels, items = [], []  # items: (row, question dict or None), pixels aligned
                for r in rows:
                    asked = question_rows[r] if question_rows is not None else [None]
                    if not asked:  # an image without questions (test-dev): nothing to answer
                        results[r] = []
                        continue
                    try:
                        image = transform(_image_of(tsv[r], images, r, max_pixels))
                    except GitcapError as exc:
                        report.failed.append((r, keys[r], str(exc)))
                        continue
                    for q in asked:
                        pixels.append(image)
                        items.append((r, q))
                for i in range(0, len(items), batch_size):
                    chunk = items[i:i + batch_size]
                    questions_now = [q["question"] if q else None for _, q in chunk]
                    outs = generate_for_images(model, torch.stack(pixels[i:i + batch_size]), questions_now, gen,
                                               precision=precision)
                    for (r, q), o in zip(chunk, outs):
                        entry = {"caption": o.text} if q is None else {"question_id": q["question_id"], "answer": o.text}
                        results.setdefault(r, []).append(entry)
                        report.outputs += 1
                for r in sorted(results):
                    part.write(f"{r}\t{keys[r]}\t{json.dumps(results[r], ensure_ascii=False)}\n")
                part.flush()
                os.fsync(part.fileno())
                report.written += len(results)
                bar.advance(len(rows))

    barrier()  # every rank's part is on disk before rank 0 merges
    if rank == 0:
        done = _finished_rows(out, keys)
        write_tsv(out, ([done[r][0], done[r][1]] for r in sorted(done)))
        for part_file in out.parent.glob(f"{out.name}.partial-*.tsv"):
            part_file.unlink()
        report.merged = True
        if coco_json is not None:
            _write_results_json(coco_json, [done[r] for r in sorted(done)], questions is not None)
    barrier()
    return report


def _image_of(cells: list[str], images: Path, row: int, max_pixels: int):
    if len(cells) < 2:
        raise GitcapError("no image cell")
    return open_rgb(decode_image(cells[1], where=f"{images}: row {row}"), name=f"row {row}", max_pixels=max_pixels)


def _write_results_json(path: Path, rows: list[tuple[str, str]], vqa: bool) -> None:
    """COCO caption results `[{"image_id", "caption"}]`, or the VQA answer list (EvalAI's form)."""
    entries = [(key, json.loads(cell)) for key, cell in rows]
    if vqa:
        write_vqa_submission(path, [answer for _, answers in entries for answer in answers])
    else:
        write_coco_results(path, {key: captions[0]["caption"] for key, captions in entries})
