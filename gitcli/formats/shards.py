"""Tar shards (webdataset style) and their per-shard status/stats files.

Layout of a dataset folder (DESIGN.md, Formats):

    00000.tar             members KEY.jpg, KEY.txt (caption), KEY.json (url, size, status)
    00000_status.jsonl    one line per row of the shard: key, url, outcome, error
    00000_stats.json      written last: its presence means the shard is complete

NNNNN = first row // shard size and KEY = `%09d` row index, so slices fetched on different
machines never collide. Every file is written to a temporary name, fsynced and renamed,
in this order: the tar, the status file, the stats file. So an interrupted writer never
leaves a half file under a final name, and after a power loss a shard whose stats file
exists has its tar and status on disk.

Reader (the one reader: training, `gitcap fetch --retry-failed` and users' scripts):
`ShardReader(source)` (or `iter_samples(source)`) yields `Sample(key, jpeg, caption,
meta)` from a tar, a folder of shards (complete ones only) or a brace pattern
`data/{00000..00009}.tar`. With `images=False` it reads no image bytes and says where
each image lies instead (`Sample.image_ref`: tar path, offset, size), which is how
training indexes shards and reads images at random later. Members larger than
`max_member_bytes` (and sparse ones) are skipped and counted, never read.
`complete_shards(folder)` lists finished shard ids.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from gitcli.config import write_json
from gitcli.errors import GitcapError
from gitcli.formats.atomic import atomic_file, fsync_dir, fsync_file, publish_file, temporary_path

SHARD_DIGITS = 5
KEY_DIGITS = 9
FILES_DIGITS = 8  # the old one-file-per-image layout: <out>/%08d.jpg
_STATS_RE = re.compile(r"^(\d{%d,})_stats\.json$" % SHARD_DIGITS)
_BRACE_RE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def shard_name(shard_id: int) -> str:
    return f"{shard_id:0{SHARD_DIGITS}d}"


def row_key(row: int) -> str:
    return f"{row:0{KEY_DIGITS}d}"


def image_file_name(row: int) -> str:
    return f"{row:0{FILES_DIGITS}d}.jpg"


def tar_path(folder: Path, shard_id: int) -> Path:
    return Path(folder) / f"{shard_name(shard_id)}.tar"


def status_path(folder: Path, shard_id: int) -> Path:
    return Path(folder) / f"{shard_name(shard_id)}_status.jsonl"


def stats_path(folder: Path, shard_id: int) -> Path:
    return Path(folder) / f"{shard_name(shard_id)}_stats.json"


# No member gitcap writes comes near this (fetch's --max-bytes is 20 MB by default); a
# tar that declares more is hostile or broken, and reading it would allocate what it says.
MAX_MEMBER_BYTES = 64 << 20

ImageRef = tuple[str, int, int]  # (tar path, byte offset of the member's data, size)


@dataclass
class Sample:
    key: str
    jpeg: bytes
    caption: str
    meta: dict[str, Any]
    image_ref: ImageRef | None = None  # where the `.jpg` member's bytes lie in its tar


# ---- writing --------------------------------------------------------------------------
def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))


class TarShardWriter:
    """Streams samples into `NNNNN.tar` (under a temporary name until `commit`), so a
    shard of 10,000 images never sits in memory."""

    def __init__(self, folder: Path, shard_id: int):
        self.final = tar_path(folder, shard_id)
        self.tmp = temporary_path(self.final)
        self._tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        self._now = time.time()
        self.count = 0

    def add(self, key: str, jpeg: bytes, caption: str, meta: dict[str, Any]) -> None:
        _add_member(self._tar, f"{key}.jpg", jpeg, self._now)
        _add_member(self._tar, f"{key}.txt", caption.encode("utf-8"), self._now)
        _add_member(self._tar, f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8"), self._now)
        self.count += 1

    def copy_from(self, samples: Iterable[Sample]) -> None:
        for s in samples:
            self.add(s.key, s.jpeg, s.caption, s.meta)

    def commit(self) -> None:
        self._tar.close()
        publish_file(self.tmp, self.final)

    def abort(self) -> None:
        self._tar.close()
        self.tmp.unlink(missing_ok=True)


class FilesShardWriter:
    """`--format files`: `<out>/%08d.jpg` per row; the key's digits name the file."""

    def __init__(self, folder: Path, shard_id: int):
        self.folder = Path(folder)
        self.count = 0
        self._written: list[Path] = []

    def add(self, key: str, jpeg: bytes, caption: str, meta: dict[str, Any]) -> None:
        # renamed into place now, made durable together at commit (one fsync pass per shard)
        path = self.folder / image_file_name(int(key))
        tmp = temporary_path(path)
        tmp.write_bytes(jpeg)
        os.replace(tmp, path)
        self._written.append(path)
        self.count += 1

    def commit(self) -> None:
        for path in self._written:
            fsync_file(path)
        fsync_dir(self.folder)

    def abort(self) -> None:
        pass


def write_status(folder: Path, shard_id: int, lines: Iterable[dict[str, Any]]) -> None:
    with atomic_file(status_path(folder, shard_id), "w") as f:
        for line in sorted(lines, key=lambda d: d["key"]):
            f.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_stats(folder: Path, shard_id: int, stats: dict[str, Any]) -> None:
    """Written last: from here on the shard counts as complete."""
    write_json(stats_path(folder, shard_id), stats)


def discard_stats(folder: Path, shard_id: int) -> None:
    """Mark a shard incomplete before rewriting it (e.g. --retry-failed), durably: the
    old stats must not come back after a power loss over a half-rewritten shard."""
    stats_path(folder, shard_id).unlink(missing_ok=True)
    fsync_dir(Path(folder))


# ---- reading --------------------------------------------------------------------------
def complete_shards(folder: Path) -> list[int]:
    """Ids of the shards whose stats file exists (finished), ascending."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ids = [int(m.group(1)) for p in folder.iterdir() if (m := _STATS_RE.match(p.name))]
    return sorted(ids)


def read_status(folder: Path, shard_id: int) -> list[dict[str, Any]]:
    path = status_path(folder, shard_id)
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise GitcapError(f"status file missing: {path}") from None
    except json.JSONDecodeError as exc:
        raise GitcapError(f"{path} is not valid JSON lines: {exc}") from None


def read_stats(folder: Path, shard_id: int) -> dict[str, Any]:
    path = stats_path(folder, shard_id)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise GitcapError(f"stats file missing: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GitcapError(f"{path} is not valid JSON ({exc}); delete it to fetch that shard again") from None


class ShardReader:
    """Samples of tar shards, in order. Members of one key are adjacent (as webdataset
    and gitcap write them) and are grouped into one `Sample`. A member larger than
    `max_member_bytes`, or a sparse one, is never read: it is counted in `skipped` and
    the sample it belongs to is left out (a sample without its image is of no use).

    `images=False` reads neither the images nor the JSON metadata: each sample carries
    `image_ref` and an empty `jpeg`, for an index built without reading every image.
    """

    def __init__(self, source: str | Path, *, images: bool = True, max_member_bytes: int = MAX_MEMBER_BYTES):
        self.paths = shard_paths(source)
        self.images = images
        self.max_member_bytes = max_member_bytes
        self.skipped = 0  # members over the limit (or sparse), never read

    def __iter__(self) -> Iterator[Sample]:
        for path in self.paths:
            yield from self.read_tar(path)

    def read_tar(self, path: Path) -> Iterator[Sample]:
        try:
            tar = tarfile.open(path, "r")
        except (OSError, tarfile.TarError) as exc:
            raise GitcapError(f"cannot read shard {path}: {exc}") from None
        with tar:
            current: str | None = None
            parts: dict[str, bytes] = {}
            ref: ImageRef | None = None
            spoiled = False  # a member of the current key was skipped
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    if key != current:
                        if current is not None and not spoiled:
                            yield self._sample(path, current, parts, ref)
                        current, parts, ref, spoiled = key, {}, None, False
                    if member.size > self.max_member_bytes or member.issparse():
                        self.skipped += 1
                        spoiled = True
                        continue
                    if ext == "jpg":
                        ref = (str(path), member.offset_data, member.size)
                        if not self.images:
                            continue
                    elif ext == "json" and not self.images:
                        continue
                    f = tar.extractfile(member)
                    parts[ext] = f.read() if f else b""
            except (OSError, tarfile.TarError) as exc:
                raise GitcapError(f"cannot read shard {path}: {exc}") from None
            if current is not None and not spoiled:
                yield self._sample(path, current, parts, ref)

    @staticmethod
    def _sample(path: Path, key: str, parts: dict[str, bytes], ref: ImageRef | None) -> Sample:
        try:
            meta = json.loads(parts["json"]) if "json" in parts else {}
        except (ValueError, UnicodeDecodeError) as exc:
            raise GitcapError(f"cannot read shard {path}: {key}.json is not JSON ({exc})") from None
        caption = parts.get("txt", b"").decode("utf-8", errors="replace")
        return Sample(key, parts.get("jpg", b""), caption, meta, ref)


def iter_tar(path: Path, **options: Any) -> Iterator[Sample]:
    """Samples of one tar (see `ShardReader` for the options)."""
    return ShardReader(path, **options).read_tar(Path(path))


def expand_braces(pattern: str) -> list[str]:
    """`a/{000..002}.tar` -> a/000.tar, a/001.tar, a/002.tar (webdataset notation)."""
    m = _BRACE_RE.search(pattern)
    if not m:
        return [pattern]
    lo, hi = m.group(1), m.group(2)
    width = len(lo)
    out: list[str] = []
    for i in range(int(lo), int(hi) + 1):
        out += expand_braces(pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end():])
    return out


def shard_paths(source: str | Path) -> list[Path]:
    """A tar, a folder (its complete shards) or a brace pattern -> tar paths."""
    text = str(source)
    if _BRACE_RE.search(text):
        paths = [Path(p) for p in expand_braces(text)]
    elif Path(text).is_dir():
        paths = [tar_path(Path(text), i) for i in complete_shards(Path(text))]
    else:
        paths = [Path(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise GitcapError(f"shard not found: {missing[0]}")
    return paths


def iter_samples(source: str | Path, **options: Any) -> Iterator[Sample]:
    """Samples of a tar, a folder of shards or a brace pattern (see `ShardReader`)."""
    return iter(ShardReader(source, **options))
