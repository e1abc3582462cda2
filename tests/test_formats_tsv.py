import base64
import struct

import pytest

from gitcli.errors import GitcapError
from gitcli.formats import tsv


UNICODE_CAPTIONS = ["Un café à Paris 🍰", "猫がソファの上で寝ている", "a \"quoted\" caption, with \\backslash"]


def test_round_trip_unicode_and_large_rows(tmp_path):
    path = tmp_path / "x.tsv"
    big = base64.b64encode(bytes(range(256)) * 20_000).decode()  # a 6.8 MB cell
    rows = [["k0", tsv.json_cell([{"caption": c} for c in UNICODE_CAPTIONS])], ["big", big], ["k2", "plain"]]
    assert tsv.write_tsv(path, rows) == 3

    assert list(tsv.iter_tsv(path)) == rows
    with tsv.TsvFile(path) as f:
        assert len(f) == 3
        assert f[1] == rows[1]  # random access, out of order
        assert f[0] == rows[0]
        assert f[-1] == rows[2]
        assert f.keys() == ["k0", "big", "k2"]
    caps = tsv.write_tsv(tmp_path / "c.tsv", [rows[0]])
    assert caps == 1
    assert tsv.read_caption_tsv(tmp_path / "c.tsv") == {"k0": UNICODE_CAPTIONS}


def test_keys_read_only_the_key_cells(tmp_path):
    """keys() never reads an image cell: cells that are not even UTF-8 do not disturb it,
    and far fewer bytes are read than the file holds. Long keys and key-only rows too."""
    path = tmp_path / "img.tsv"
    long_key = "k" * 1000  # longer than one read
    path.write_bytes(b"a\t\xff\xfe" + b"x" * 100_000 + b"\n" + long_key.encode() + b"\tyy\nlast\r\n")
    with tsv.TsvFile(path) as f:
        real = f._f
        read = []

        class Counting:
            def seek(self, pos):
                return real.seek(pos)

            def read(self, n=-1):
                data = real.read(n)
                read.append(len(data))
                return data

        f._f = Counting()
        assert f.keys() == ["a", long_key, "last"]
        assert sum(read) < 5_000
        f._f = real


def test_both_line_indexes_hold_the_byte_offsets(tmp_path):
    path = tmp_path / "x.tsv"
    rows = [["é", "ü" * 3], ["b", "x"], ["c", "🍰"]]
    tsv.write_tsv(path, rows)
    data = path.read_bytes()
    expected = [0]
    for line in data.split(b"\n")[:-2]:
        expected.append(expected[-1] + len(line) + 1)
    assert (tmp_path / "x.tsv.lineidx").read_text() == "".join(f"{o}\n" for o in expected)
    raw = (tmp_path / "x.tsv.lineidx.8b").read_bytes()
    assert list(struct.unpack("<3q", raw)) == expected
    assert tsv.read_lineidx(path) == expected


def test_index_built_when_missing_and_rebuilt_when_stale(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\t1\nb\t2\n", encoding="utf-8")
    assert not (tmp_path / "x.tsv.lineidx").exists()
    with tsv.TsvFile(path) as f:
        assert f[1] == ["b", "2"]
    assert (tmp_path / "x.tsv.lineidx.8b").exists()

    # only the text index present (e.g. from older tools): it is read
    (tmp_path / "x.tsv.lineidx.8b").unlink()
    assert tsv.read_lineidx(path) == [0, 4]

    # the TSV grew after indexing: the index is rebuilt, not trusted
    import os

    with open(path, "a", encoding="utf-8") as fh:
        fh.write("c\t3\n")
    old = path.stat().st_mtime - 10
    os.utime(tmp_path / "x.tsv.lineidx", (old, old))
    assert tsv.read_lineidx(path) == [0, 4, 8]


def test_blank_lines_are_not_rows_for_either_reader(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\t1\n\nb\t2\n\n", encoding="utf-8")
    with tsv.TsvFile(path) as f:
        assert list(f) == list(tsv.iter_tsv(path)) == [["a", "1"], ["b", "2"]]


def test_write_is_atomic_and_refuses_tabs(tmp_path):
    path = tmp_path / "x.tsv"
    tsv.write_tsv(path, [["a", "1"]])
    with pytest.raises(GitcapError, match="tab or a line break"):
        tsv.write_tsv(path, [["a", "2"], ["b", "x\ty"]])
    assert path.read_text() == "a\t1\n"  # the old file survives a failed write
    assert not (tmp_path / "x.tsv.tmp").exists()


def test_bad_base64_is_a_clear_error():
    assert tsv.decode_image(tsv.encode_image(b"\x89PNGabc"), where="r") == b"\x89PNGabc"
    with pytest.raises(GitcapError, match=r"x.tsv: row 3.*not valid base64"):
        tsv.decode_image("not base64!!", where="x.tsv: row 3")


@pytest.mark.parametrize(
    "line, message",
    [
        ('k\t[{"caption": "a"', "not valid JSON"),
        ('k\t{"caption": "a"}', 'expected \\[\\{"caption"'),
        ('k\t[{"caption": 3}]', 'expected \\[\\{"caption"'),
        ("k", "has 1 cells"),
        ('k\t[]\tz', "has 3 cells"),
    ],
)
def test_malformed_caption_tsv(tmp_path, line, message):
    path = tmp_path / "c.tsv"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(GitcapError, match=message):
        tsv.read_caption_tsv(path)


def test_duplicate_caption_key(tmp_path):
    path = tmp_path / "c.tsv"
    path.write_text('k\t[{"caption": "a"}]\nk\t[{"caption": "b"}]\n', encoding="utf-8")
    with pytest.raises(GitcapError, match="appears twice"):
        tsv.read_caption_tsv(path)


def test_vqa_results_keyed_and_one_column(tmp_path):
    keyed = tmp_path / "k.tsv"
    keyed.write_text('1\t[{"question_id": 10, "answer": "yes"}, {"question_id": 11, "answer": "2"}]\n', encoding="utf-8")
    git = tmp_path / "g.tsv"
    git.write_text('{"answer": "yes", "question_id": 10}\n{"answer": "2", "question_id": "11"}\n', encoding="utf-8")
    expected = [{"question_id": 10, "answer": "yes"}, {"question_id": 11, "answer": "2"}]
    assert tsv.read_vqa_result_tsv(keyed) == expected
    assert tsv.read_vqa_result_tsv(git) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"answer": "yes", "question_id": 1.5}', "question_id must be an integer"),
        ('{"answer": "yes", "question_id": "q7"}', "question_id must be an integer"),
        ('{"answer": 3, "question_id": 1}', "is not a string"),
        ('{"answer": "yes"}', "expected"),
        ('1\t{"answer": "yes", "question_id": 1}', "expected"),
        ('1\t[{"answer": "yes", "question_id": 1}', "not valid JSON"),
    ],
)
def test_malformed_vqa_results(tmp_path, line, message):
    path = tmp_path / "r.tsv"
    path.write_text(line + "\n", encoding="utf-8")
    with pytest.raises(GitcapError, match=message):
        tsv.read_vqa_result_tsv(path)


def test_missing_file(tmp_path):
    with pytest.raises(GitcapError, match="not found"):
        list(tsv.iter_tsv(tmp_path / "nope.tsv"))
    with pytest.raises(GitcapError, match="not found"):
        tsv.TsvFile(tmp_path / "nope.tsv")
