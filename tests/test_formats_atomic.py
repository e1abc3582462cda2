"""One helper for atomic files, one for atomic directories: whole or nothing, durable,
modes per umask, and leftovers of a killed writer cleared."""

from __future__ import annotations

import os
import stat

import pytest

from gitcli.formats.atomic import (atomic_dir, atomic_file, copy_dir_atomic, file_mode, remove_temporaries,
                                   staging_dir, temporary_path, write_text)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_file(target, "w") as fh:
            fh.write("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_files_and_directories_get_the_umask_modes_not_tempfiles_private_ones(tmp_path):
    write_text(tmp_path / "a.txt", "x")
    assert _mode(tmp_path / "a.txt") == file_mode() == 0o666 & ~_umask()
    with atomic_dir(tmp_path / "ckpt") as staging:
        (staging / "w.bin").write_bytes(b"1")
        (staging / "lm").mkdir(mode=0o700)
        private = staging / "lm" / "model.safetensors"
        private.write_bytes(b"2")
        os.chmod(private, 0o600)  # as safetensors creates its files
    assert _mode(tmp_path / "ckpt") == 0o777 & ~_umask()
    assert _mode(tmp_path / "ckpt" / "lm") == 0o777 & ~_umask()
    assert _mode(tmp_path / "ckpt" / "lm" / "model.safetensors") == 0o666 & ~_umask()
    assert (tmp_path / "ckpt" / "w.bin").read_bytes() == b"1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_directory_is_replaced_whole(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "new").write_text("n")
    target = tmp_path / "best"
    target.mkdir()
    (target / "old").write_text("o")
    copy_dir_atomic(src, target)
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "src"]
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as staging:
            (staging / "half").write_text("h")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["new"]


def test_leftovers_of_a_killed_writer_are_removed_or_restored(tmp_path):
    temporary_path(tmp_path / "a.tsv").write_text("half")
    (staging_dir(tmp_path / "checkpoint-5") / "w").write_text("half")
    # a kill between the two renames of a directory swap: the old copy is put back
    best = tmp_path / "best"
    (tmp_path / ".best.old").mkdir()
    (tmp_path / ".best.old" / "w").write_text("previous best")
    (tmp_path / ".keep.old").mkdir()  # its original exists: the stale copy goes
    (tmp_path / "keep").mkdir()
    (tmp_path / ".other-user-file").write_text("not ours")
    touched = remove_temporaries(tmp_path)
    assert len(touched) == 4
    assert (best / "w").read_text() == "previous best"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other-user-file", "best", "keep"]


def test_only_one_targets_leftovers_when_asked(tmp_path):
    mine, theirs = temporary_path(tmp_path / "r.tsv"), temporary_path(tmp_path / "other.tsv")
    assert remove_temporaries(tmp_path, target="r.tsv") == [mine]
    assert theirs.exists() and not mine.exists()
