"""The orchestration: rows stream from the TSV through download (asyncio, aiohttp) and
image processing (worker processes) into shard writers, with bounded concurrency.

Memory is bounded by `--concurrency` rows in flight (download + processing) plus the
status lines of the open shards; the TSV is never loaded. Ctrl-C cancels the rows in
flight and deletes the temporary files of unfinished shards; finished shards are final.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

from gitcli.fetch import outcomes
from gitcli.fetch.config import FetchConfig
from gitcli.fetch.http import Downloader
from gitcli.fetch.outcomes import FetchFailure
from gitcli.fetch.plan import Planner, ShardPlan
from gitcli.fetch.policy import UrlExclusions
from gitcli.fetch.report import Reporter, write_overall_stats
from gitcli.fetch.shard import ShardJob
from gitcli.fetch.worker import init_worker, process_image
from gitcli.formats.cc import Row, read_rows


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
    cfg.out.mkdir(parents=True, exist_ok=True)
    exclusions = UrlExclusions(cfg.exclude_urls)
    planner = Planner(cfg)
    total = planner.count(read_rows(cfg.tsv, cfg.layout))
    summary = FetchSummary()
    started = time.time()
    with Reporter(console, total, enabled=cfg.progress) as reporter:
        asyncio.run(_Run(cfg, planner, exclusions, reporter, summary).main())
    summary.outcomes = reporter.counts
    summary.bytes_downloaded = reporter.bytes
    summary.seconds = time.time() - started
    summary.overall = write_overall_stats(cfg.out)
    return summary


class _Run:
    def __init__(self, cfg: FetchConfig, planner: Planner, exclusions: UrlExclusions, reporter: Reporter, summary: FetchSummary):
        self.cfg = cfg
        self.planner = planner
        self.exclusions = exclusions
        self.reporter = reporter
        self.summary = summary
        self.jobs: dict[int, ShardJob] = {}
        self.pool: Executor | None = None
        self.downloader: Downloader | None = None

    async def main(self) -> None:
        if self.cfg.processes > 0:
            self.pool = ProcessPoolExecutor(self.cfg.processes, initializer=init_worker, initargs=(self.cfg.image,))
        else:
            init_worker(self.cfg.image, ignore_sigint=False)
        slots = asyncio.Semaphore(self.cfg.concurrency)
        tasks: set[asyncio.Task] = set()
        try:
            async with Downloader(self.cfg) as self.downloader:
                for plan, row in self.planner.work(read_rows(self.cfg.tsv, self.cfg.layout)):
                    job = self.jobs.get(plan.shard_id) or self._open(plan)
                    if row is None:
                        job.closed = True
                        self._maybe_finish(job)
                        continue
                    await slots.acquire()  # backpressure: at most --concurrency rows in flight
                    job.pending += 1
                    task = asyncio.create_task(self._row(job, row, slots))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                if tasks:
                    await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for job in self.jobs.values():
                job.abort()
            if self.pool is not None:
                self.pool.shutdown(wait=True, cancel_futures=True)

    def _open(self, plan: ShardPlan) -> ShardJob:
        job = self.jobs[plan.shard_id] = ShardJob(self.cfg, plan)
        return job

    def _maybe_finish(self, job: ShardJob) -> None:
        if job.closed and job.pending == 0 and not job.finished:
            job.finish()
            self.summary.shards_written.append(job.shard_id)
            del self.jobs[job.shard_id]

    async def _row(self, job: ShardJob, row: Row, slots: asyncio.Semaphore) -> None:
        outcome, nbytes = outcomes.OK, 0
        try:
            outcome, nbytes = await self._fetch_row(job, row)
        finally:
            slots.release()
            job.pending -= 1
        job.bytes_downloaded += nbytes
        self.reporter.row_done(outcome, nbytes)
        self._maybe_finish(job)

    async def _fetch_row(self, job: ShardJob, row: Row) -> tuple[str, int]:
        """Download, process and record one row; returns (outcome, bytes downloaded)."""
        if self.exclusions.excluded(row.url):
            job.record_failure(row.index, row.url, outcomes.EXCLUDED, "excluded URL")
            return outcomes.EXCLUDED, 0
        assert self.downloader is not None
        try:
            download = await self.downloader.get(row.url)
        except FetchFailure as failure:
            job.record_failure(row.index, row.url, failure.outcome, failure.detail)
            return failure.outcome, 0
        nbytes = len(download.body)
        if self.pool is not None:
            result = await asyncio.get_running_loop().run_in_executor(self.pool, process_image, download.body)
        else:
            result = process_image(download.body)
        if result[0] != "ok":
            job.record_failure(row.index, row.url, result[1], result[2])
            return result[1], nbytes
        _, jpeg, width, height, ow, oh = result
        meta = {
            "width": width,
            "height": height,
            "original_width": ow,
            "original_height": oh,
            "bytes": len(jpeg),
            "downloaded_bytes": nbytes,
        }
        if download.url != row.url:
            meta["final_url"] = download.url
        job.record_ok(row.index, row.url, row.caption, jpeg, meta)
        return outcomes.OK, nbytes
