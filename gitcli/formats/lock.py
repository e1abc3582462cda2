"""One writer per output: an advisory lock that the OS releases when its process dies.

A command that owns an output (a fetch folder, a training run directory, a result TSV)
holds `OutputLock` on it for as long as it writes. A second command aimed at the same
output is refused at once, in one line that names the first one's pid, instead of
racing it. Processes that share an output by design (the `--part I/N` runs of one fetch,
the ranks of one torchrun job) take differently named locks, or only rank 0 takes it.

`flock` on a small file holding the owner's pid: the kernel drops the lock with the
process (a SIGKILL included), so a stale lock file never blocks anyone. The file is
removed on release; a process that opened it just before is detected by comparing
inodes and tries again. Standard library only (POSIX).
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from gitcli.errors import GitcapError


class OutputLock:
    """`with OutputLock(path, what="output folder data/x"):` ... ; raises GitcapError when
    another process holds it. `hint` is appended to the message (what the user can do)."""

    def __init__(self, path: str | Path, *, what: str, hint: str = "wait for it to finish or choose another output") -> None:
        self.path = Path(path)
        self.what = what
        self.hint = hint
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(100):  # only retried while the file is being replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise GitcapError(f"cannot lock {self.path}: {exc.strerror}") from None
                raise GitcapError(f"{self.what} is in use by another gitcap process ({self._owner()}); "
                                  f"{self.hint}") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released and removed it between our open and flock
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            self._fd = fd
            return self
        raise GitcapError(f"cannot lock {self.path}: it keeps being replaced")

    def _owner(self) -> str:
        try:
            pid = self.path.read_text(encoding="ascii").strip()
        except OSError:
            pid = ""
        return f"pid {pid}" if pid.isdigit() else "pid unknown"

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can be mid-acquire on it
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_for_file(output: str | Path) -> Path:
    """The lock file of an output file: `.NAME.lock` beside it."""
    output = Path(output)
    return output.with_name(f".{output.name}.lock")


def lock_for_dir(output: str | Path, name: str = "gitcap") -> Path:
    """The lock file of an output folder: `FOLDER/.NAME.lock`."""
    return Path(output) / f".{name}.lock"
