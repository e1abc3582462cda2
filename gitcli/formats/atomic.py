"""Atomic, durable writes: one helper for a file, one for a directory.

Every output gitcap writes appears whole or not at all, and survives a power loss once it
is visible:
- a file is written under a temporary name beside its target (`.NAME.tmp-XXXXXXXX`),
  flushed and fsynced, renamed over the target, and the directory is fsynced so the
  rename itself is on disk;
- a directory (a checkpoint) is built under a temporary name, every file and folder in it
  is fsynced, then it is swapped in by renames and the parent is fsynced.

Temporary files and directories get the modes an ordinary `open()` / `mkdir()` would
give under the process's umask (tempfile's private 0600/0700 would otherwise survive
the rename and keep colleagues on a shared file system out). `remove_temporaries` clears
what a killed writer left behind; callers run it while they hold the output's lock.

Standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

TMP_MARK = ".tmp-"  # every temporary name is `.{target name}.tmp-{random}`
OLD_SUFFIX = ".old"  # `.{target name}.old`: a directory being replaced


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask can only be read by setting it


def file_mode() -> int:
    """The mode `open(path, "w")` gives a new file here."""
    return 0o666 & ~_UMASK


def dir_mode() -> int:
    """The mode `mkdir` gives a new directory here."""
    return 0o777 & ~_UMASK


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _umask_modes(path: Path) -> None:
    """Give every file and folder under `path` the modes the umask gives: some writers
    (safetensors among them) create their files 0600 whatever the umask, which would keep
    colleagues on a shared file system out of a checkpoint."""
    for root, dirs, files in os.walk(path):
        os.chmod(root, dir_mode())
        for name in files:
            os.chmod(Path(root) / name, file_mode())


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under `path`, and `path` itself."""
    path = Path(path)
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def temporary_path(target: Path) -> Path:
    """A new, empty temporary file beside `target` (mode per umask), for a writer that
    streams into it and then calls `publish_file`."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent)
    os.close(fd)
    os.chmod(name, file_mode())
    return Path(name)


def publish_file(tmp: Path, target: Path) -> None:
    """fsync `tmp`, rename it over `target`, fsync the directory."""
    fsync_file(tmp)
    os.replace(tmp, target)
    fsync_dir(Path(target).parent)


@contextlib.contextmanager
def atomic_file(target: str | Path, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing; on a clean exit it replaces `target` durably,
    on an exception it is removed and `target` is left as it was."""
    target = Path(target)
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    tmp = temporary_path(target)
    try:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_file(target, "wb") as fh:
        fh.write(data)


def write_text(target: str | Path, text: str) -> None:
    with atomic_file(target, "w") as fh:
        fh.write(text)


def write_json(target: str | Path, data: Any) -> None:
    write_text(target, json.dumps(data, indent=2, sort_keys=False) + "\n")


def staging_dir(target: Path) -> Path:
    """A new, empty temporary directory beside `target` (mode per umask)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TMP_MARK}", dir=target.parent))
    os.chmod(tmp, dir_mode())
    return tmp


def publish_dir(staging: Path, target: Path) -> None:
    """Make the complete directory `staging` appear as `target`, durably.

    The contents are fsynced before any rename. An existing `target` is first renamed
    to `.NAME.old` and removed after the swap; a kill between the two renames leaves
    `.NAME.old`, which `remove_temporaries` puts back.
    """
    staging, target = Path(staging), Path(target)
    _umask_modes(staging)
    fsync_tree(staging)
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    staging.rename(target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging directory; on a clean exit it becomes `target` (see
    `publish_dir`), on an exception it is removed and `target` is left as it was."""
    target = Path(target)
    tmp = staging_dir(target)
    try:
        yield tmp
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_dir_atomic(source: Path, target: Path) -> None:
    """Copy the directory `source` to `target`; readers see the old `target` or the new."""
    with atomic_dir(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def remove_temporaries(folder: str | Path, target: str | None = None) -> list[Path]:
    """Clear what killed writers left in `folder` (not below it): temporary files and
    directories are deleted, a `.NAME.old` whose `NAME` is gone is renamed back, one whose
    `NAME` exists is deleted. With `target`, only the leftovers of that one name are
    touched (an output file in a folder that holds other things). Returns what was
    removed or restored.

    Only safe while no other process writes into `folder`: callers hold its lock.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if not name.startswith("."):
            continue
        if target is not None and not (name.startswith(f".{target}{TMP_MARK}") or name == f".{target}{OLD_SUFFIX}"):
            continue
        if TMP_MARK in name:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            touched.append(entry)
        elif name.endswith(OLD_SUFFIX) and len(name) > 1 + len(OLD_SUFFIX):
            original = folder / name[1:-len(OLD_SUFFIX)]
            if original.exists():
                shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            else:
                entry.rename(original)
            touched.append(entry)
    if touched:
        fsync_dir(folder)
    return touched
