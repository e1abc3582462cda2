"""Tar shards: atomic writing, the reader API training uses, completeness."""

from __future__ import annotations

import tarfile

import pytest

from gitcli.errors import GitcapError
from gitcli.formats import shards
from support.shards import sparse_member_tar

from gitcli.formats.shards import (
    TarShardWriter,
    complete_shards,
    expand_braces,
    iter_samples,
    read_status,
    write_stats,
    write_status,
)


def write_shard(folder, shard_id, keys, complete=True):
    w = TarShardWriter(folder, shard_id)
    for k in keys:
        w.add(shards.row_key(k), f"jpeg{k}".encode(), f"caption {k} é", {"url": f"http://x/{k}"})
    w.commit()
    write_status(folder, shard_id, [{"key": shards.row_key(k), "url": f"http://x/{k}", "outcome": "ok", "error": None} for k in reversed(keys)])
    if complete:
        write_stats(folder, shard_id, {"rows": len(keys), "ok": len(keys)})


def test_round_trip_with_webdataset_member_names(tmp_path):
    write_shard(tmp_path, 0, [0, 1, 2])
    with tarfile.open(tmp_path / "00000.tar") as tar:
        assert tar.getnames() == [f"00000000{i}.{e}" for i in range(3) for e in ("jpg", "txt", "json")]
    samples = list(iter_samples(tmp_path / "00000.tar"))
    assert [(s.key, s.jpeg, s.caption, s.meta["url"]) for s in samples] == [
        (f"00000000{i}", f"jpeg{i}".encode(), f"caption {i} é", f"http://x/{i}") for i in range(3)]
    # status lines come back sorted by key whatever the order they were recorded in
    assert [s["key"] for s in read_status(tmp_path, 0)] == ["000000000", "000000001", "000000002"]


def test_folder_reads_only_complete_shards(tmp_path):
    write_shard(tmp_path, 0, [0, 1])
    write_shard(tmp_path, 1, [2, 3], complete=False)  # no stats: still being written
    write_shard(tmp_path, 2, [4])
    assert complete_shards(tmp_path) == [0, 2]
    assert [s.key for s in iter_samples(tmp_path)] == ["000000000", "000000001", "000000004"]


def test_brace_patterns(tmp_path):
    write_shard(tmp_path, 0, [0])
    write_shard(tmp_path, 1, [5])
    assert expand_braces("d/{00..02}.tar") == ["d/00.tar", "d/01.tar", "d/02.tar"]
    assert [s.key for s in iter_samples(f"{tmp_path}/{{00000..00001}}.tar")] == ["000000000", "000000005"]
    with pytest.raises(GitcapError, match="not found"):
        list(iter_samples(f"{tmp_path}/{{00000..00002}}.tar"))


def test_aborted_writer_leaves_no_file(tmp_path):
    w = TarShardWriter(tmp_path, 3)
    w.add("000000030", b"x", "c", {})
    assert not (tmp_path / "00003.tar").exists()  # nothing under the final name until commit
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_sparse_member_declaring_3_gb_is_skipped_and_counted_never_read(tmp_path):
    import tracemalloc

    path = tmp_path / "00000.tar"
    sparse_member_tar(path, declared=3 << 30)
    assert path.stat().st_size < 20_000
    with tarfile.open(path) as tar:
        assert tar.getmembers()[0].size == 3 << 30  # what a naive reader would allocate
    for images in (True, False):  # the full reader and training's index
        tracemalloc.start()
        reader = shards.ShardReader(path, images=images)
        samples = list(reader)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert [s.key for s in samples] == ["000000001"] and samples[0].caption == "caption 1"
        assert reader.skipped == 1
        assert peak < 10 << 20


def test_members_over_the_limit_are_skipped_with_their_sample(tmp_path):
    write_shard(tmp_path, 0, [0, 1, 2])
    reader = shards.ShardReader(tmp_path / "00000.tar", max_member_bytes=len("caption 1 é".encode()) - 1)
    # captions and metadata are over this limit (the 5-byte images are not): no sample survives
    assert list(reader) == [] and reader.skipped == 6
    reader = shards.ShardReader(tmp_path / "00000.tar", max_member_bytes=30)
    assert [s.key for s in reader] == ["000000000", "000000001", "000000002"] and reader.skipped == 0


def test_index_mode_says_where_each_image_lies(tmp_path):
    write_shard(tmp_path, 0, [0, 1])
    indexed = list(shards.ShardReader(tmp_path, images=False))
    assert [(s.key, s.jpeg, s.meta, s.caption) for s in indexed] == [
        ("000000000", b"", {}, "caption 0 é"), ("000000001", b"", {}, "caption 1 é")]
    for s, full in zip(indexed, iter_samples(tmp_path)):
        path, offset, size = s.image_ref
        with open(path, "rb") as f:
            f.seek(offset)
            assert f.read(size) == full.jpeg == f"jpeg{int(s.key)}".encode()
        assert full.image_ref == s.image_ref


def test_a_truncated_tar_is_one_gitcap_error(tmp_path):
    write_shard(tmp_path, 0, [0, 1, 2])
    data = (tmp_path / "00000.tar").read_bytes()
    (tmp_path / "00000.tar").write_bytes(data[:700])
    with pytest.raises(GitcapError, match="cannot read shard"):
        list(iter_samples(tmp_path / "00000.tar"))
