"""Conceptual Captions TSV: `caption<TAB>url`, no header, one row per image.

Rows are streamed (never loaded whole) so a 3M-row file costs no memory; `.gz` files are
read transparently. Other layouts (a header, other column order, a URL-only list) are
described by `TsvLayout`. The 0-based row index is the row's key everywhere downstream.
The one parser of this format: `gitcap fetch` and training (`--data TSV --image-root`)
both read it here, so they number rows alike.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from gitcli.errors import GitcapError


@dataclass(frozen=True)
class Row:
    index: int  # 0-based row number among data rows (the header is not a row)
    caption: str
    url: str


@dataclass(frozen=True)
class TsvLayout:
    """Which columns hold what. Columns are 0-based indexes, or names when `header`."""

    caption_column: str = "0"
    url_column: str = "1"
    header: bool = False
    separator: str = "\t"


def _open_text(path: Path) -> io.TextIOBase:
    if not path.exists():
        raise GitcapError(f"TSV not found: {path}")
    if path.is_dir():
        raise GitcapError(f"expected a TSV file, got a folder: {path}")
    with open(path, "rb") as probe:
        magic = probe.read(2)
    raw = gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")
    # newline="\n": only \n ends a row, so a stray \r inside a caption cannot split it
    return io.TextIOWrapper(raw, encoding="utf-8", errors="replace", newline="\n")


def _column_index(spec: str, names: list[str] | None, what: str) -> int | None:
    """`"2"` -> 2; `"url"` -> its position in the header; `""`/`"none"` -> no column."""
    if spec in ("", "none"):
        return None
    if spec.isdigit():
        return int(spec)
    if names is None:
        raise GitcapError(f"{what} column {spec!r} is a name; add --header (or give a 0-based index)")
    if spec not in names:
        raise GitcapError(f"{what} column {spec!r} is not in the header ({', '.join(names)})")
    return names.index(spec)


def read_rows(path: Path, layout: TsvLayout = TsvLayout()) -> Iterator[Row]:
    """Yield every data row in file order. Short/blank lines still count as rows
    (with an empty URL) so that row indexes match the line numbers users see."""
    path = Path(path)
    with _open_text(path) as f:
        names = None
        if layout.header:
            first = f.readline()
            names = first.rstrip("\r\n").split(layout.separator)
        url_col = _column_index(layout.url_column, names, "url")
        if url_col is None:
            raise GitcapError("a URL column is required")
        cap_col = _column_index(layout.caption_column, names, "caption")
        for index, line in enumerate(f):
            parts = line.rstrip("\r\n").split(layout.separator)
            url = parts[url_col].strip() if url_col < len(parts) else ""
            caption = parts[cap_col] if cap_col is not None and cap_col < len(parts) else ""
            yield Row(index, caption, url)
