"""Worker processes: each fetches whole shards with its own asyncio loop and aiohttp
session, decoding and resizing in its own small thread pool (shard_fetch.py).

Why whole shards rather than one image at a time: handing every downloaded body to a
process pool and the JPEG back costs more main-process CPU (pickling, pipes, thread
hand-offs) than the download itself, and the main process then caps throughput at about
one core. A worker that owns a shard shares nothing: network and CPU still overlap (the
kernel keeps receiving while an image decodes, and the other workers run meanwhile).
Progress goes back to the main process as small batched counts.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import time
from collections import Counter
from typing import Any

from gitcli.fetch.config import FetchConfig
from gitcli.fetch.plan import ShardPlan
from gitcli.formats.cc import Row

_progress_queue: Any = None


def init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    # idle workers ignore Ctrl-C; a worker busy with a shard handles it (see run_shard)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        # die with the main process (even on SIGKILL), so no orphan keeps writing a shard
        # that a rerun is about to fetch again
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class _BatchedProgress:
    """Sends (outcome counts, bytes) at most every 0.2 s: one message per image would
    cost more than it tells."""

    def __init__(self, queue: Any):
        self.queue = queue
        self.counts: Counter[str] = Counter()
        self.bytes = 0
        self.last = time.monotonic()

    def __call__(self, outcome: str, nbytes: int) -> None:
        self.counts[outcome] += 1
        self.bytes += nbytes
        if time.monotonic() - self.last > 0.2:
            self.flush()

    def flush(self) -> None:
        if self.counts:
            self.queue.put((dict(self.counts), self.bytes))
            self.counts, self.bytes = Counter(), 0
        self.last = time.monotonic()


def run_shard(cfg: FetchConfig, plan: ShardPlan, rows: list[Row]) -> dict[str, Any]:
    """Entry point in a worker process: fetch one shard, return its stats."""
    from gitcli.fetch.shard_fetch import fetch_shard

    progress = _BatchedProgress(_progress_queue)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return asyncio.run(fetch_shard(cfg, plan, rows, progress))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        progress.flush()
