"""The Conceptual Captions TSV reader: plain and gzip, other layouts, odd lines."""

from __future__ import annotations

import gzip

import pytest

from gitcli.errors import GitcapError
from gitcli.formats.cc import Row, TsvLayout, read_rows


def test_plain_tsv_rows_are_indexed_from_zero(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_text("a dog\thttp://x/1.jpg\na cat\r\n".replace("\r\n", "\thttp://x/2.jpg\r\n"), encoding="utf-8")
    assert list(read_rows(p)) == [Row(0, "a dog", "http://x/1.jpg"), Row(1, "a cat", "http://x/2.jpg")]


def test_gzip_is_read_transparently_and_lazily(tmp_path):
    p = tmp_path / "cc.tsv.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for i in range(1000):
            f.write(f"caption {i}\thttp://x/{i}.jpg\n")
    rows = read_rows(p)
    assert next(rows) == Row(0, "caption 0", "http://x/0.jpg")  # a generator: streamed
    assert sum(1 for _ in rows) == 999


def test_header_and_named_columns(tmp_path):
    p = tmp_path / "other.tsv"
    p.write_text("url\tid\tcaption\nhttp://x/a.jpg\t7\tan apple\n", encoding="utf-8")
    layout = TsvLayout(caption_column="caption", url_column="url", header=True)
    assert list(read_rows(p, layout)) == [Row(0, "an apple", "http://x/a.jpg")]
    assert list(read_rows(p, TsvLayout(caption_column="none", url_column="0", header=True))) == [Row(0, "", "http://x/a.jpg")]


def test_short_and_blank_lines_keep_their_row_numbers(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_text("one\thttp://x/1\n\nonly caption\nfour\thttp://x/4\n", encoding="utf-8")
    rows = list(read_rows(p))
    assert [r.index for r in rows] == [0, 1, 2, 3]
    assert [r.url for r in rows] == ["http://x/1", "", "", "http://x/4"]


def test_carriage_return_inside_a_caption_does_not_split_the_row(tmp_path):
    p = tmp_path / "cc.tsv"
    p.write_bytes(b"odd\rcaption\thttp://x/1\nnext\thttp://x/2\n")
    rows = list(read_rows(p))
    assert len(rows) == 2 and rows[1] == Row(1, "next", "http://x/2")


def test_mistakes_are_gitcap_errors(tmp_path):
    with pytest.raises(GitcapError, match="not found"):
        list(read_rows(tmp_path / "missing.tsv"))
    p = tmp_path / "cc.tsv"
    p.write_text("a\tb\n", encoding="utf-8")
    with pytest.raises(GitcapError, match="--header"):
        list(read_rows(p, TsvLayout(url_column="url")))
    with pytest.raises(GitcapError, match="not in the header"):
        list(read_rows(p, TsvLayout(url_column="url", header=True)))
