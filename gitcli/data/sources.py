"""Training sources -> (records, image loader).

Each loader is a small picklable object (DataLoader workers receive a copy) that turns a
record's image reference into a PIL image, raising GitcapError when it cannot.
"""

from __future__ import annotations

import random
from pathlib import Path

from gitcli.config import DataConfig
from gitcli.data.datasets import Record
from gitcli.data.images import open_rgb
from gitcli.data.synthetic import make_scene
from gitcli.errors import GitcapError


class SyntheticImages:
    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __call__(self, index: int):
        return make_scene(self.seed, index).image


class FileImages:
    def __call__(self, path: str):
        return open_rgb(path)


class TarMemberImages:
    """Reads one member of a tar shard by its byte offset: random access, no extraction."""

    def __call__(self, ref: tuple[str, int, int]):
        path, offset, size = ref
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                data = fh.read(size)
        except OSError as exc:
            raise GitcapError(f"cannot read {path}: {exc}") from None
        return open_rgb(data, name=f"{path}@{offset}")


class TsvImages:
    """Images of a GIT image TSV (`key<TAB>base64`), read by row through its line index.

    The file is opened lazily in each DataLoader worker (an open file cannot be pickled).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._tsv = None

    def __getstate__(self):
        return {"path": self.path, "_tsv": None}

    def __call__(self, row: int):
        from gitcli.formats.tsv import TsvFile, decode_image

        if self._tsv is None:
            self._tsv = TsvFile(Path(self.path))
        cells = self._tsv[row]
        where = f"{self.path}: row {row}"
        if len(cells) < 2:
            raise GitcapError(f"{where} has no image cell")
        return open_rgb(decode_image(cells[1], where=where), name=where)


def git_tsv_records(image_tsv: Path, caption_tsv: Path) -> tuple[list[Record], int]:
    """Every caption of every image row; images without captions are left out."""
    from gitcli.formats.tsv import TsvFile, read_caption_tsv

    captions = read_caption_tsv(caption_tsv)
    with TsvFile(image_tsv) as tsv:
        keys = tsv.keys()
    records = [Record(row, None, c, key=key) for row, key in enumerate(keys) for c in captions.get(key, []) if c.strip()]
    unlabelled = sum(1 for k in keys if k not in captions)
    return records, unlabelled


def most_common_answer(answers: list[dict]) -> str:
    """The VQA training target: the answer most annotators gave (first one on ties)."""
    from collections import Counter

    counts = Counter(a["answer"].strip() for a in answers)
    return counts.most_common(1)[0][0]


def _coco_image_files(folder: Path) -> dict[str, str]:
    """COCO file names end in the zero-padded image id (COCO_val2014_000000000042.jpg)."""
    import re

    files = {}
    for p in folder.iterdir():
        m = re.search(r"(\d+)$", p.stem)
        if m and p.suffix.lower() in (".jpg", ".jpeg", ".png"):
            files[str(int(m.group(1)))] = str(p)
    return files


def vqa_records(images: Path, questions: Path, annotations: Path) -> tuple[list[Record], object, int]:
    """VQA questions + annotations over a COCO image folder or a GIT image TSV.

    -> (records, image loader, questions whose image is missing)
    """
    from gitcli.formats.coco import read_vqa_annotations, read_vqa_questions

    qs = read_vqa_questions(questions)
    anns = read_vqa_annotations(annotations)
    if images.is_dir():
        by_id: dict[str, object] = dict(_coco_image_files(images))
        loader: object = FileImages()
    elif images.is_file():
        from gitcli.formats.tsv import TsvFile

        with TsvFile(images) as tsv:
            by_id = {key: row for row, key in enumerate(tsv.keys())}
        loader = TsvImages(str(images))
    else:
        raise GitcapError(f"image source not found: {images}")
    records, missing = [], 0
    for q in qs:
        ann = anns.get(q["question_id"])
        if ann is None:
            raise GitcapError(f"{annotations} has no annotation for question {q['question_id']}")
        ref = by_id.get(str(q["image_id"]))
        if ref is None:
            missing += 1
            continue
        records.append(Record(ref, q["question"], most_common_answer(ann["answers"]), key=str(q["question_id"])))
    return records, loader, missing


def shard_records(source: str) -> tuple[list[Record], int]:
    """Index the tar shards `gitcap fetch` writes: where each image lies, and its caption
    (formats.shards reads them; no image is read here). -> (records, members skipped)"""
    from gitcli.formats.shards import ShardReader

    reader = ShardReader(source, images=False)
    records = [Record(s.image_ref, None, caption, key=s.key)
               for s in reader if s.image_ref is not None and (caption := s.caption.strip())]
    return records, reader.skipped


def synthetic_records(size: int, seed: int, task: str, questions_per_scene: int = 0) -> list[Record]:
    """Each scene gives its canonical caption and/or its question/answer pairs: all of
    them, or `questions_per_scene` drawn (seeded) from them, which keeps captions from
    being outnumbered when both tasks train together."""
    if task not in ("captions", "vqa", "both"):
        raise GitcapError("--task takes captions, vqa or both")
    records = []
    for i in range(size):
        scene = make_scene(seed, i)
        if task in ("captions", "both"):
            records.append(Record(i, None, scene.captions[0], key=str(i)))
        if task in ("vqa", "both"):
            qa = scene.qa
            if 0 < questions_per_scene < len(qa):
                qa = random.Random(f"{seed}:{i}:questions").sample(qa, questions_per_scene)
            records.extend(Record(i, q, a, key=str(i)) for q, a in qa)
    return records


def cc_tsv_records(tsv: Path, image_root: Path) -> tuple[list[Record], int]:
    """Conceptual Captions `caption<TAB>url` rows; images `%08d.jpg` by row. -> (records, missing)

    Parsed by formats.cc, the parser `gitcap fetch` uses, so row N here is the row that
    fetch saved as N (a stray carriage return splits neither)."""
    from gitcli.formats.cc import read_rows

    records, missing = [], 0
    for row in read_rows(tsv):
        caption = row.caption.strip()
        if not caption:
            continue
        image = image_root / f"{row.index:08d}.jpg"
        if not image.is_file():
            missing += 1
            continue
        records.append(Record(str(image), None, caption, key=f"{row.index:08d}"))
    return records, missing


def source_kind(cfg: DataConfig) -> str:
    """What kind of training data `cfg` names: synthetic, vqa, git-tsv, shards or cc-tsv.
    Cheap (no file is read), so a run refuses a missing or unknown source before it
    creates or loads anything."""
    src = cfg.source
    if src == "synthetic":
        return "synthetic"
    path = Path(src)
    if "{" not in src and not path.exists():
        raise GitcapError(f"training data not found: {src}")
    if cfg.questions or cfg.annotations:
        if not (cfg.questions and cfg.annotations):
            raise GitcapError("VQA training needs both --questions and --annotations")
        return "vqa"
    if cfg.captions:
        return "git-tsv"
    if path.suffix == ".tar" or path.is_dir() or "{" in src:
        if path.is_dir() and next(path.glob("*.tar"), None) is None:
            raise GitcapError(f"{src} holds no .tar shards (the output of gitcap fetch)")
        return "shards"
    if path.suffix in (".tsv", ".gz") and cfg.image_root:
        return "cc-tsv"
    raise GitcapError(
        f"cannot tell what kind of data {src!r} is: use synthetic, a shard folder, a CC TSV with "
        "--image-root, a GIT image TSV with --captions, or VQA JSON with --questions/--annotations"
    )


def build_source(cfg: DataConfig):
    """-> (records, loader, notes) for the configured source."""
    kind, src = source_kind(cfg), cfg.source
    if kind == "synthetic":
        records = synthetic_records(cfg.synthetic_size, cfg.synthetic_seed, cfg.task, cfg.questions_per_scene)
        return records, SyntheticImages(cfg.synthetic_seed), {}
    path = Path(src)
    if kind == "vqa":
        records, loader, missing = vqa_records(path, Path(cfg.questions), Path(cfg.annotations))
        return records, loader, {"questions without image": missing}
    if kind == "git-tsv":
        records, unlabelled = git_tsv_records(path, Path(cfg.captions))
        return records, TsvImages(src), {"images without captions": unlabelled}
    if kind == "shards":
        records, skipped = shard_records(src)
        return records, TarMemberImages(), ({"oversized tar members skipped": skipped} if skipped else {})
    records, missing = cc_tsv_records(path, Path(cfg.image_root))
    return records, FileImages(), {"missing images": missing}
