"""Build GIT TSVs (image, caption, question) from image folders and COCO/VQA files.

Keys follow DESIGN.md: the COCO image id (decimal) for images listed in a COCO file,
the file stem for an image folder. Every TSV is written atomically with its `.lineidx`
and `.lineidx.8b`. Image bytes are stored as they are (no re-encoding), so scores do not
depend on a JPEG round trip.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

from gitcli.config import read_json
from gitcli.errors import GitcapError
from gitcli.formats.coco import read_coco_captions, read_karpathy_split, read_vqa_questions
from gitcli.formats.tsv import encode_image, iter_tsv, json_cell, write_tsv

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
Progress = Callable[[int], None]  # told the number of rows written so far


def _is_jpeg_or_png(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"


def _image_cell(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GitcapError(f"image not found: {path}") from None
    if not _is_jpeg_or_png(data):
        raise GitcapError(f"{path} is not a JPEG or PNG file (GIT image TSVs hold JPEG or PNG bytes)")
    return encode_image(data)


def folder_images(folder: Path) -> list[tuple[str, Path]]:
    """(stem, path) of the JPEG/PNG files directly in `folder`, sorted by name."""
    if not folder.is_dir():
        raise GitcapError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise GitcapError(f"{folder} holds no .jpg, .jpeg or .png file")
    seen: dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise GitcapError(f"two images share the key {p.stem!r}: {seen[p.stem].name} and {p.name}")
        seen[p.stem] = p
    return list(seen.items())


def coco_images(coco_json: Path, image_root: Path, split_keys: list[str] | None = None) -> list[tuple[str, Path]]:
    """(image id, path) of the images a COCO annotation file lists, optionally one split's."""
    data = read_json(coco_json, what="COCO annotation file")
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise GitcapError(f'{coco_json} is not a COCO annotation file (no "images" list)')
    by_key: dict[str, Path] = {}
    for i, im in enumerate(images):
        if not isinstance(im, dict) or isinstance(im.get("id"), bool) or not isinstance(im.get("id"), int):
            raise GitcapError(f"{coco_json}: images[{i}] needs an integer id, got {str(im)[:60]}")
        if not isinstance(im.get("file_name"), str):
            raise GitcapError(f"{coco_json}: images[{i}] needs a file_name")
        by_key[str(im["id"])] = image_root / im["file_name"]
    if split_keys is None:
        return list(by_key.items())
    missing = [k for k in split_keys if k not in by_key]
    if missing:
        raise GitcapError(f"{len(missing)} images of the split are not in {coco_json} (e.g. id {missing[0]})")
    return [(k, by_key[k]) for k in split_keys]


def build_image_tsv(images: list[tuple[str, Path]], out: Path, *, progress: Progress | None = None) -> int:
    """Write `key<TAB>base64` rows for (key, path) pairs; returns the row count."""

    def rows() -> Iterator[list[str]]:
        for n, (key, path) in enumerate(images, 1):
            yield [key, _image_cell(path)]
            if progress:
                progress(n)

    return write_tsv(out, rows())


def build_caption_tsv(
    coco_json: Path, out: Path, *, split: Path | None = None, split_name: str = "test"
) -> int:
    """Write `key<TAB>[{"caption": ...}, ...]` rows from a COCO caption annotation file.

    With a Karpathy split file, only that split's images, in the split file's order.
    """
    captions = read_coco_captions(coco_json)
    if split is not None:
        keys = read_karpathy_split(split, split_name)
        missing = [k for k in keys if k not in captions]
        if missing:
            raise GitcapError(
                f"{len(missing)} images of split {split_name!r} have no caption in {coco_json} (e.g. id {missing[0]})"
            )
    else:
        keys = list(captions)
    return write_tsv(out, ([k, json_cell([{"caption": c} for c in captions[k]])] for k in keys))


def image_tsv_keys(path: Path) -> list[str]:
    """The keys of an image TSV, in row order (duplicates refused: rows must be addressable)."""
    keys: list[str] = []
    seen: set[str] = set()
    for i, row in enumerate(iter_tsv(path)):
        if row[0] in seen:
            raise GitcapError(f"{path}: row {i}: key {row[0]!r} appears twice")
        seen.add(row[0])
        keys.append(row[0])
    if not keys:
        raise GitcapError(f"{path} has no rows")
    return keys


def build_question_tsv(questions_json: Path, image_tsv: Path, out: Path) -> tuple[int, int]:
    """Write one question row per image-TSV row, in the same order, so the two align.

    Rows are `key<TAB>[{"question": ..., "question_id": N}, ...]` (questions in the
    questions file's order; `[]` for an image without questions). A question whose image
    is not in the image TSV is an error: it could never be answered. Returns (rows,
    images without questions).
    """
    questions = read_vqa_questions(questions_json)
    keys = image_tsv_keys(image_tsv)
    by_image: dict[str, list[dict]] = {k: [] for k in keys}
    orphans = [q for q in questions if q["image_id"] not in by_image]
    if orphans:
        raise GitcapError(
            f"{len(orphans)} questions ask about images not in {image_tsv} (e.g. question {orphans[0]['question_id']} "
            f"about image {orphans[0]['image_id']}); build the image TSV from the same split"
        )
    for q in questions:
        by_image[q["image_id"]].append({"question": q["question"], "question_id": q["question_id"]})
    empty = sum(1 for k in keys if not by_image[k])
    rows = write_tsv(out, ([k, json_cell(by_image[k])] for k in keys))
    return rows, empty
