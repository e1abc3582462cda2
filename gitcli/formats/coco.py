"""COCO and VQA JSON files: caption annotations and results, the Karpathy split,
VQA questions, annotations and EvalAI submissions.

Keys: gitcap keys images by strings (the TSV key). A COCO image id is an integer; when
gitcap writes COCO JSON, a key made only of digits becomes an integer `image_id`, any
other key stays a string.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gitcli.config import read_json, write_json
from gitcli.errors import GitcapError


def coco_image_id(key: str) -> int | str:
    """The `image_id` COCO JSON gets for a gitcap key: an int when the key is all digits."""
    return int(key) if key.isascii() and key.isdigit() else key


def _image_key(value: Any, *, where: str) -> str:
    """A COCO image id (int, or a string in non-COCO sets) -> gitcap's string key."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise GitcapError(f"{where}: image_id must be an integer or a string, got {value!r}")
    return str(value)


def _int_id(value: Any, *, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise GitcapError(f"{where}: {what} must be an integer, got {value!r}")
    return value


def _list_field(data: Any, name: str, path: Path, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise GitcapError(f'{path} is not {what} (no "{name}" list)')
    return data[name]


# ---- captions ------------------------------------------------------------------------
def read_coco_captions(path: Path) -> dict[str, list[str]]:
    """A COCO caption annotation file -> {key: [caption, ...]}.

    Keys follow the `images` list's order (the order COCOEvalCap scores in); images
    without any caption are left out, since nothing can be scored against them.
    """
    path = Path(path)
    data = read_json(path, what="COCO caption file")
    anns = _list_field(data, "annotations", path, "a COCO caption annotation file")
    order = [_image_key(im.get("id") if isinstance(im, dict) else None, where=f"{path}: images[{i}]")
             for i, im in enumerate(data.get("images") or [])]
    captions: dict[str, list[str]] = {}
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise GitcapError(f"{where} is not an object")
        key = _image_key(ann.get("image_id"), where=where)
        if not isinstance(ann.get("caption"), str):
            raise GitcapError(f"{where}: caption must be a string, got {ann.get('caption')!r}")
        captions.setdefault(key, []).append(ann["caption"])
    ordered = {k: captions[k] for k in order if k in captions}
    ordered.update((k, v) for k, v in captions.items() if k not in ordered)
    return ordered


def read_coco_results(path: Path) -> dict[str, str]:
    """COCO caption results `[{"image_id": ..., "caption": ...}]` -> {key: caption}."""
    path = Path(path)
    data = read_json(path, what="COCO results file")
    if not isinstance(data, list):
        raise GitcapError(f'{path} is not a COCO results file (expected [{{"image_id": ..., "caption": ...}}, ...])')
    out: dict[str, str] = {}
    for i, item in enumerate(data):
        where = f"{path}: item {i}"
        if not isinstance(item, dict):
            raise GitcapError(f"{where} is not an object")
        key = _image_key(item.get("image_id"), where=where)
        if not isinstance(item.get("caption"), str):
            raise GitcapError(f"{where}: caption must be a string, got {item.get('caption')!r}")
        if key in out:
            raise GitcapError(f"{where}: image {key} has two results; COCO scoring takes one caption per image")
        out[key] = item["caption"]
    return out


def write_coco_results(path: Path, results: dict[str, str]) -> None:
    """{key: caption} -> COCO results JSON, atomically."""
    write_json(Path(path), [{"image_id": coco_image_id(k), "caption": c} for k, c in results.items()])


def read_karpathy_split(path: Path, split: str = "test") -> list[str]:
    """Image keys (COCO ids) of one split of Karpathy's `dataset_coco.json`, in file order.

    `restval` images are part of training in the usual setup; ask for it by name.
    """
    path = Path(path)
    data = read_json(path, what="Karpathy split file")
    images = _list_field(data, "images", path, "a Karpathy split file (dataset_coco.json)")
    keys = []
    for i, im in enumerate(images):
        where = f"{path}: images[{i}]"
        if not isinstance(im, dict) or "split" not in im:
            raise GitcapError(f'{where} has no "split"')
        if im["split"] == split:
            cocoid = im.get("cocoid", im.get("id"))
            keys.append(_image_key(_int_id(cocoid, what="cocoid", where=where), where=where))
    if not keys:
        found = sorted({im.get("split") for im in images if isinstance(im, dict)} - {None})
        raise GitcapError(f"{path} has no image in split {split!r} (splits: {', '.join(map(str, found))})")
    return keys


# ---- VQA -----------------------------------------------------------------------------
def read_vqa_questions(path: Path) -> list[dict[str, Any]]:
    """VQA questions JSON -> [{"question_id": int, "image_id": key, "question": str}]."""
    path = Path(path)
    data = read_json(path, what="VQA questions file")
    questions = _list_field(data, "questions", path, "a VQA questions file")
    out = []
    seen: set[int] = set()
    for i, q in enumerate(questions):
        where = f"{path}: questions[{i}]"
        if not isinstance(q, dict):
            raise GitcapError(f"{where} is not an object")
        qid = _int_id(q.get("question_id"), what="question_id", where=where)
        if qid in seen:
            raise GitcapError(f"{where}: question_id {qid} appears twice")
        seen.add(qid)
        if not isinstance(q.get("question"), str):
            raise GitcapError(f"{where}: question must be a string, got {q.get('question')!r}")
        out.append({"question_id": qid, "image_id": _image_key(q.get("image_id"), where=where), "question": q["question"]})
    return out


def read_vqa_annotations(path: Path) -> dict[int, dict[str, Any]]:
    """VQA annotations JSON -> {question_id: annotation}, checked, in file order.

    Each annotation keeps `answers` (the human answers as given, with their
    `answer_id`), `question_type` and `answer_type`, which the official metric uses.
    """
    path = Path(path)
    data = read_json(path, what="VQA annotations file")
    anns = _list_field(data, "annotations", path, "a VQA annotations file")
    out: dict[int, dict[str, Any]] = {}
    for i, ann in enumerate(anns):
        where = f"{path}: annotations[{i}]"
        if not isinstance(ann, dict):
            raise GitcapError(f"{where} is not an object")
        qid = _int_id(ann.get("question_id"), what="question_id", where=where)
        if qid in out:
            raise GitcapError(f"{where}: question_id {qid} appears twice")
        answers = ann.get("answers")
        if not isinstance(answers, list) or not answers:
            raise GitcapError(f"{where}: answers must be a non-empty list")
        for a in answers:
            if not isinstance(a, dict) or not isinstance(a.get("answer"), str):
                raise GitcapError(f'{where}: every answer must be {{"answer": "...", ...}}, got {str(a)[:60]}')
        for field in ("question_type", "answer_type"):
            if not isinstance(ann.get(field), str):
                raise GitcapError(f"{where}: {field} must be a string, got {ann.get(field)!r}")
        out[qid] = ann
    return out


def read_vqa_submission(path: Path) -> list[dict[str, Any]]:
    """An EvalAI submission `[{"question_id": int, "answer": str}]`, checked."""
    from gitcli.formats.tsv import check_vqa_answer

    path = Path(path)
    data = read_json(path, what="VQA results file")
    if not isinstance(data, list):
        raise GitcapError(f'{path} is not a VQA results file (expected [{{"question_id": N, "answer": "..."}}, ...])')
    return [check_vqa_answer(item, where=f"{path}: item {i}") for i, item in enumerate(data)]


def write_vqa_submission(path: Path, answers: list[dict[str, Any]]) -> None:
    write_json(Path(path), [{"question_id": a["question_id"], "answer": a["answer"]} for a in answers])
