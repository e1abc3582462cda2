"""The orchestration: the TSV streams past, rows are grouped into the shards this run
must fetch (plan.py), and whole shards are dealt to `--processes` worker processes
(worker.py), at most one queued shard per worker ahead, so memory stays bounded whatever
the TSV size. The main process only plans, shows progress and sums up.

One run per part of a folder: the run holds an advisory lock on `--out` (one per
`--part I/N`, so the parts of one fetch share the folder) from start to end.

Ctrl-C: every process gets SIGINT; workers drop the temporary files of their unfinished
shards, finished shards are final; `gitcap fetch` exits 130.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import multiprocessing
import os
import queue as queue_module
import signal
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from gitcli.errors import GitcapError
from gitcli.fetch import outcomes
from gitcli.fetch.config import FetchConfig
from gitcli.fetch.plan import Planner, shards_with_rows
from gitcli.fetch.report import FetchProgress, write_overall_stats
from gitcli.fetch.shard_fetch import fetch_shard
from gitcli.fetch.worker import init_worker, run_shard
from gitcli.formats.cc import read_rows
from gitcli.formats.lock import OutputLock, lock_for_dir


@dataclass
class FetchSummary:
    outcomes: Counter = field(default_factory=Counter)  # this run's rows by outcome
    shards_written: list[int] = field(default_factory=list)
    seconds: float = 0.0
    bytes_downloaded: int = 0
    overall: dict[str, Any] = field(default_factory=dict)  # every complete shard in --out

    @property
    def rows(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> int:
        return self.outcomes.get(outcomes.OK, 0)


def fetch(cfg: FetchConfig, console: Console | None = None) -> FetchSummary:
    """Fetch every row of `cfg.tsv` that this run is responsible for (see plan.py)."""
    cfg.validate()
    check_input(cfg)  # a missing TSV or a wrong column must not leave an empty --out behind
    cfg.out.mkdir(parents=True, exist_ok=True)
    with output_lock(cfg):
        return _fetch_locked(cfg, console)


def output_lock(cfg: FetchConfig) -> OutputLock:
    """One run per part of a folder: the `--part I/N` runs that share a folder by design
    take differently named locks; a second run of the same part is refused."""
    i, n = cfg.part
    if n == 1:
        return OutputLock(lock_for_dir(cfg.out, "fetch"), what=f"--out {cfg.out}",
                          hint="wait for it to finish or fetch into another --out")
    return OutputLock(lock_for_dir(cfg.out, f"fetch-part-{i}-of-{n}"), what=f"--part {i}/{n} of --out {cfg.out}",
                      hint="wait for it to finish or fetch another part")


def _fetch_locked(cfg: FetchConfig, console: Console | None) -> FetchSummary:
    planner = Planner(cfg)
    total = planner.count(read_rows(cfg.tsv, cfg.layout))
    summary = FetchSummary()
    started = time.time()
    with FetchProgress(console, total, enabled=cfg.progress) as fetch_progress:
        if cfg.processes == 0:
            _fetch_in_process(cfg, planner, fetch_progress, summary)
        else:
            _fetch_in_workers(cfg, planner, fetch_progress, summary)
    summary.outcomes = fetch_progress.counts
    summary.bytes_downloaded = fetch_progress.bytes
    summary.seconds = time.time() - started
    summary.overall = write_overall_stats(cfg.out)
    return summary


INPUT_PROBE_ROWS = 100  # rows read to judge that the input is a URL list at all


def check_input(cfg: FetchConfig) -> None:
    """Read the TSV's first rows: a missing file, a folder, an unknown column or a name
    without --header, an empty file, or one with no URL where the URLs should be (a
    binary file, the wrong --url-column) is a GitcapError here, before anything is created."""
    rows = read_rows(cfg.tsv, cfg.layout)
    try:
        first = list(itertools.islice(rows, INPUT_PROBE_ROWS))
    finally:
        rows.close()
    if not first:
        raise GitcapError(f"{cfg.tsv} has no rows to fetch")
    if not any("://" in row.url for row in first):
        raise GitcapError(f"no URL in the first {len(first)} rows of {cfg.tsv}: is it a caption<TAB>url TSV? "
                          "(see --url-column, --caption-column, --header)")


def _fetch_in_process(cfg: FetchConfig, planner: Planner, fetch_progress: FetchProgress, summary: FetchSummary) -> None:
    for plan, rows in shards_with_rows(planner, read_rows(cfg.tsv, cfg.layout)):
        asyncio.run(fetch_shard(cfg, plan, rows, fetch_progress.row_done))
        summary.shards_written.append(plan.shard_id)


def _worker_config(cfg: FetchConfig) -> FetchConfig:
    """Each worker gets its share of the connection limits."""
    n = cfg.processes
    return dataclasses.replace(cfg, concurrency=max(1, cfg.concurrency // n), per_host=max(1, cfg.per_host // n))


def _fetch_in_workers(cfg: FetchConfig, planner: Planner, fetch_progress: FetchProgress, summary: FetchSummary) -> None:
    # spawn, not fork: the main process runs rich's refresh thread, and forking a
    # process with threads can copy a held lock into the child
    ctx = multiprocessing.get_context("spawn")
    progress = ctx.Queue()
    worker_cfg = _worker_config(cfg)
    pending: dict[Future, int] = {}

    def drain(block_s: float) -> None:
        deadline = time.monotonic() + block_s
        while True:
            try:
                counts, nbytes = progress.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue_module.Empty:
                return
            fetch_progress.add_counts(counts, nbytes)

    def collect(done) -> None:
        for fut in done:
            shard_id = pending.pop(fut)
            fut.result()  # a worker's exception (a bug, or Ctrl-C) surfaces here
            summary.shards_written.append(shard_id)

    with ProcessPoolExecutor(cfg.processes, mp_context=ctx, initializer=init_worker, initargs=(progress,)) as pool:
        try:
            for plan, rows in shards_with_rows(planner, read_rows(cfg.tsv, cfg.layout)):
                while len(pending) > cfg.processes:  # one shard queued ahead per worker
                    drain(0.1)
                    collect(wait(pending, timeout=0, return_when=FIRST_COMPLETED).done)
                pending[pool.submit(run_shard, worker_cfg, plan, rows)] = plan.shard_id
            while pending:
                drain(0.1)
                collect(wait(pending, timeout=0, return_when=FIRST_COMPLETED).done)
            drain(0.3)  # the last batched counts
        except KeyboardInterrupt:
            # a Ctrl-C in a terminal reaches every process; `kill -INT` only this one:
            # pass it on so busy workers drop their unfinished shards now instead of
            # finishing them while shutdown waits
            for child in multiprocessing.active_children():
                try:
                    os.kill(child.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
            pool.shutdown(wait=True, cancel_futures=True)
            raise
