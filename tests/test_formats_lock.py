"""One writer per output: a second process is refused in one line naming the first's pid;
the lock goes with its process, SIGKILL included."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from gitcli.errors import GitcapError
from gitcli.formats.lock import OutputLock, lock_for_dir, lock_for_file

HOLD = """
import sys, time
from gitcli.formats.lock import OutputLock
lock = OutputLock(sys.argv[1], what="x").acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_with_the_first_ones_pid(tmp_path):
    path = lock_for_dir(tmp_path / "run")
    proc = _holder(path)
    try:
        with pytest.raises(GitcapError, match=rf"run folder is in use by another gitcap process \(pid {proc.pid}\)"):
            OutputLock(path, what="run folder").acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # the kernel released it with the process: the next writer gets it at once
    with OutputLock(path, what="run folder") as lock:
        assert lock.held
    assert not path.exists()  # removed on release


def test_the_same_process_cannot_take_it_twice_and_release_is_idempotent(tmp_path):
    path = lock_for_file(tmp_path / "out.tsv")
    assert path.name == ".out.tsv.lock"
    first = OutputLock(path, what="out.tsv").acquire()
    with pytest.raises(GitcapError, match=f"pid {os.getpid()}"):
        OutputLock(path, what="out.tsv").acquire()
    first.release()
    first.release()
    again = OutputLock(path, what="out.tsv").acquire()
    again.release()


def test_releases_and_reacquires_under_contention(tmp_path):
    path = tmp_path / ".l.lock"
    wins = 0
    deadline = time.time() + 1.0
    while time.time() < deadline:
        try:
            with OutputLock(path, what="l"):
                wins += 1
        except GitcapError:
            pass
    assert wins > 0 and not path.exists()
