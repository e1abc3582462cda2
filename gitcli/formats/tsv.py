"""GIT TSV files: rows of tab-separated cells, their line indexes, random access.

Conventions of Microsoft's GenerativeImage2Text tooling:
- image TSV    `key<TAB>base64(jpeg|png)`
- caption TSV  `key<TAB>[{"caption": "..."}, ...]`
- question TSV `key<TAB>[{"question": "...", "question_id": N}, ...]`
- result TSVs  `key<TAB>[{"caption": "..."}]` or `key<TAB>[{"question_id": N, "answer": "..."}]`
- `X.tsv.lineidx`: the byte offset of every row, in decimal, one per line;
  `X.tsv.lineidx.8b`: the same offsets as little-endian int64 (GIT's binary form).

Files are written atomically (a temporary file renamed into place), so a reader never
sees half a TSV; both indexes are written beside every TSV gitcap writes.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from gitcli.errors import GitcapError
from gitcli.formats.atomic import atomic_file, write_bytes


KEY_READ = 256  # bytes read at a time while looking for the end of a row's key


def lineidx_path(path: Path) -> Path:
    return Path(f"{path}.lineidx")


def lineidx8b_path(path: Path) -> Path:
    return Path(f"{path}.lineidx.8b")


# ---- cells -------------------------------------------------------------------------
def _check_cell(cell: str, path: Path, row: int) -> str:
    if not isinstance(cell, str):
        raise GitcapError(f"{path}: row {row}: a cell is {type(cell).__name__}, not text")
    if "\t" in cell or "\n" in cell or "\r" in cell:
        raise GitcapError(f"{path}: row {row}: a cell contains a tab or a line break: {cell[:60]!r}")
    return cell


def encode_image(data: bytes) -> str:
    """Image file bytes -> the base64 cell of an image TSV."""
    return base64.b64encode(data).decode("ascii")


def decode_image(cell: str, *, where: str) -> bytes:
    """The base64 cell of an image TSV -> image file bytes; `where` names the row in errors."""
    try:
        return base64.b64decode(cell, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise GitcapError(f"{where}: the image cell is not valid base64 ({exc})") from None


def json_cell(value: Any) -> str:
    """A JSON cell: compact, unicode kept readable (no tabs or newlines can appear)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def parse_json_cell(cell: str, *, where: str) -> Any:
    try:
        return json.loads(cell)
    except json.JSONDecodeError as exc:
        raise GitcapError(f"{where}: the cell is not valid JSON ({exc.msg} at character {exc.pos}): {cell[:60]!r}") from None


# ---- writing -------------------------------------------------------------------------
def write_tsv(path: Path, rows: Iterable[Sequence[str]], *, index: bool = True) -> int:
    """Write rows atomically (and both line indexes); returns the number of rows."""
    path = Path(path)
    offsets: list[int] = []
    pos = 0
    with atomic_file(path, "wb") as f:
        for n, row in enumerate(rows):
            line = ("\t".join(_check_cell(c, path, n) for c in row) + "\n").encode("utf-8")
            offsets.append(pos)
            f.write(line)
            pos += len(line)
    if index:
        write_lineidx(path, offsets)
    return len(offsets)


def write_lineidx(path: Path, offsets: Sequence[int]) -> None:
    """Write `X.lineidx` (decimal) and `X.lineidx.8b` (little-endian int64), atomically."""
    for target, data in (
        (lineidx_path(path), "".join(f"{o}\n" for o in offsets).encode("ascii")),
        (lineidx8b_path(path), struct.pack(f"<{len(offsets)}q", *offsets)),
    ):
        write_bytes(target, data)


# ---- indexes -------------------------------------------------------------------------
def scan_offsets(path: Path) -> list[int]:
    """The byte offset of every row, by reading the whole file.

    Blank lines are not rows (as in `iter_tsv`), so row i means the same thing to both.
    """
    offsets, pos = [], 0
    try:
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
    except FileNotFoundError:
        raise GitcapError(f"TSV file not found: {path}") from None
    except IsADirectoryError:
        raise GitcapError(f"{path} is a folder, not a TSV file") from None
    return offsets


def build_lineidx(path: Path) -> list[int]:
    """Scan `path` and write both indexes beside it (GIT's convention), where its folder
    can be written: in a read-only folder the index lives in memory for this run."""
    offsets = scan_offsets(path)
    try:
        write_lineidx(path, offsets)
    except OSError:
        pass
    return offsets


def _fresh(index: Path, tsv: Path) -> bool:
    return index.exists() and index.stat().st_mtime >= tsv.stat().st_mtime


def read_lineidx(path: Path, *, build: bool = True) -> list[int]:
    """Row offsets of `path`: from `.lineidx.8b`, else `.lineidx`, else built (and written).

    An index older than its TSV, or pointing past its end, is rebuilt rather than trusted.
    """
    path = Path(path)
    if not path.exists():
        raise GitcapError(f"TSV file not found: {path}")
    if path.is_dir():
        raise GitcapError(f"{path} is a folder, not a TSV file")
    size = path.stat().st_size
    offsets: list[int] | None = None
    binary, text = lineidx8b_path(path), lineidx_path(path)
    if _fresh(binary, path):
        data = binary.read_bytes()
        if len(data) % 8 == 0:
            offsets = list(struct.unpack(f"<{len(data) // 8}q", data))
    if offsets is None and _fresh(text, path):
        try:
            offsets = [int(line) for line in text.read_text(encoding="ascii").split()]
        except (ValueError, UnicodeDecodeError):
            offsets = None
    if offsets is not None and all(0 <= o < size for o in offsets[-1:]) and offsets == sorted(offsets):
        return offsets
    if not build:
        raise GitcapError(f"{path} has no usable line index")
    return build_lineidx(path)


# ---- reading -------------------------------------------------------------------------
def _split(raw: bytes, path: Path, row: int) -> list[str]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise GitcapError(f"{path}: row {row} is not UTF-8 text") from None
    return line.rstrip("\r\n").split("\t")


def iter_tsv(path: Path) -> Iterator[list[str]]:
    """Rows of a TSV, in order, as lists of cells (streamed, any size)."""
    path = Path(path)
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise GitcapError(f"TSV file not found: {path}") from None
    except IsADirectoryError:
        raise GitcapError(f"{path} is a folder, not a TSV file") from None
    with f:
        for n, raw in enumerate(f):
            if raw.strip():
                yield _split(raw, path, n)


class TsvFile:
    """Random access to the rows of a TSV through its line index (built when missing)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.offsets = read_lineidx(self.path)
        self._f = open(self.path, "rb")

    def __len__(self) -> int:
        return len(self.offsets)

    def __getitem__(self, row: int) -> list[str]:
        if not -len(self) <= row < len(self):
            raise IndexError(row)
        self._f.seek(self.offsets[row])
        return _split(self._f.readline(), self.path, row % len(self))

    def __iter__(self) -> Iterator[list[str]]:
        for i in range(len(self)):
            yield self[i]

    def keys(self) -> list[str]:
        """The first cell of every row, reading only as far as its first tab: an image TSV's
        base64 cells (most of its bytes) are never read or decoded."""
        return [self.key(i) for i in range(len(self))]

    def key(self, row: int) -> str:
        self._f.seek(self.offsets[row])
        head = b""
        while True:
            chunk = self._f.read(KEY_READ)
            head += chunk
            end = min((i for i in (head.find(b"\t"), head.find(b"\n")) if i >= 0), default=-1)
            if end >= 0 or not chunk:
                break
        return _split(head if end < 0 else head[:end], self.path, row)[0]

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "TsvFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- typed rows ----------------------------------------------------------------------
def _cells(row: list[str], n: int, path: Path, i: int, what: str) -> list[str]:
    if len(row) != n:
        raise GitcapError(f"{path}: row {i} has {len(row)} cells; a {what} row has {n} (key<TAB>...)")
    return row


def read_caption_tsv(path: Path) -> dict[str, list[str]]:
    """A caption TSV (labels or results) -> {key: [caption, ...]}, in file order."""
    path = Path(path)
    out: dict[str, list[str]] = {}
    for i, row in enumerate(iter_tsv(path)):
        key, cell = _cells(row, 2, path, i, "caption TSV")
        where = f"{path}: row {i} (key {key!r})"
        value = parse_json_cell(cell, where=where)
        if not isinstance(value, list) or not all(isinstance(d, dict) and isinstance(d.get("caption"), str) for d in value):
            raise GitcapError(f'{where}: expected [{{"caption": "..."}}, ...]')
        if key in out:
            raise GitcapError(f"{where}: key {key!r} appears twice")
        out[key] = [d["caption"] for d in value]
    return out


def read_question_tsv(path: Path, keys: Sequence[str]) -> list[list[dict[str, Any]]]:
    """A question TSV aligned row by row with an image TSV whose keys are `keys` ->
    per row `[{"question": str, "question_id": int}, ...]`. An image may have no
    questions (`[]`: a test-dev image of test2015), which is kept as an empty list."""
    path = Path(path)
    rows = list(iter_tsv(path))
    if len(rows) != len(keys):
        raise GitcapError(f"{path} has {len(rows)} rows but the image TSV has {len(keys)}; they must align row by row")
    out = []
    for i, (row, key) in enumerate(zip(rows, keys)):
        if len(row) != 2:
            raise GitcapError(f"{path}: row {i} has {len(row)} cells; a question row is key<TAB>[...]")
        if row[0] != key:
            raise GitcapError(f"{path}: row {i} has key {row[0]!r} but the image TSV's row {i} has {key!r}")
        where = f"{path}: row {i} (key {key!r})"
        items = parse_json_cell(row[1], where=where)
        if not isinstance(items, list):
            raise GitcapError(f'{where}: expected [{{"question": "...", "question_id": N}}, ...]')
        for q in items:
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) \
                    or isinstance(q.get("question_id"), bool) or not isinstance(q.get("question_id"), int):
                raise GitcapError(f'{where}: each question needs "question" (text) and "question_id" (integer)')
        out.append(items)
    return out


def read_vqa_result_tsv(path: Path) -> list[dict[str, Any]]:
    """VQA results -> [{"question_id": int, "answer": str}, ...], in file order.

    Accepts gitcap's keyed form `key<TAB>[{"question_id": N, "answer": "..."}, ...]` and
    GIT's one-column form `{"answer": "...", "question_id": N}` per line.
    """
    path = Path(path)
    out: list[dict[str, Any]] = []
    for i, row in enumerate(iter_tsv(path)):
        where = f"{path}: row {i}"
        if len(row) == 1:
            items = [parse_json_cell(row[0], where=where)]
        elif len(row) == 2:
            where += f" (key {row[0]!r})"
            items = parse_json_cell(row[1], where=where)
            if not isinstance(items, list):
                raise GitcapError(f'{where}: expected [{{"question_id": N, "answer": "..."}}, ...]')
        else:
            raise GitcapError(f"{where} has {len(row)} cells; a VQA result row has 1 or 2")
        for item in items:
            out.append(check_vqa_answer(item, where=where))
    return out


def check_vqa_answer(item: Any, *, where: str) -> dict[str, Any]:
    """One `{"question_id": int, "answer": str}`, with clear errors for wrong types."""
    if not isinstance(item, dict) or "question_id" not in item or "answer" not in item:
        raise GitcapError(f'{where}: expected {{"question_id": N, "answer": "..."}}, got {str(item)[:60]}')
    qid = item["question_id"]
    if isinstance(qid, bool) or not isinstance(qid, int):
        if isinstance(qid, str) and qid.isdigit():
            qid = int(qid)  # GIT's tools sometimes write ids as strings
        else:
            raise GitcapError(f"{where}: question_id must be an integer, got {qid!r}")
    if not isinstance(item["answer"], str):
        raise GitcapError(f"{where}: the answer of question {qid} is not a string: {item['answer']!r}")
    return {"question_id": qid, "answer": item["answer"]}
