"""Fetch the rows of one shard: download (bounded concurrency), validate and normalise
each image, write it into the shard, finish the shard. Runs inside a worker process (or
the main process with --processes 0).

Images are decoded in a small thread pool, not on the event loop: Pillow releases the
GIL while it decodes, resizes and encodes, so downloads keep flowing while an image is
worked on, and one slow image does not hold up the worker's other rows.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from gitcli.fetch import outcomes
from gitcli.fetch.config import FetchConfig, default_processes
from gitcli.fetch.http import Downloader
from gitcli.fetch.outcomes import FetchFailure
from gitcli.fetch.plan import ShardPlan
from gitcli.fetch.policy import UrlExclusions
from gitcli.fetch.shard import ShardJob
from gitcli.formats.cc import Row
from gitcli.formats.images import ImageRejected, normalize_image

OnRow = Callable[[str, int], None]  # (outcome, bytes downloaded) per finished row


def decode_threads(cfg: FetchConfig) -> int:
    """Decoding threads of one worker: its share of the cores (all of them with
    --processes 0), and at least 2, so that one slow image never stalls the others."""
    cores = default_processes()
    share = cores if cfg.processes == 0 else -(-cores // cfg.processes)
    return max(2, share)


async def fetch_shard(cfg: FetchConfig, plan: ShardPlan, rows: list[Row], on_row: OnRow) -> dict[str, Any]:
    exclusions = UrlExclusions(cfg.exclude_urls)
    job = ShardJob(cfg, plan)
    slots = asyncio.Semaphore(cfg.concurrency)
    decoder = ThreadPoolExecutor(decode_threads(cfg), thread_name_prefix="gitcap-decode")
    try:
        async with Downloader(cfg) as downloader:

            async def one(row: Row) -> None:
                async with slots:
                    outcome, nbytes = await _fetch_row(cfg, job, row, downloader, exclusions, decoder)
                job.bytes_downloaded += nbytes
                on_row(outcome, nbytes)

            await asyncio.gather(*(one(row) for row in rows))
        return job.finish()
    finally:
        decoder.shutdown(wait=True, cancel_futures=True)  # no thread still writes when the job is dropped
        job.abort()  # no-op once finished; otherwise drops the temporary files


async def _fetch_row(cfg: FetchConfig, job: ShardJob, row: Row, downloader: Downloader,
                     exclusions: UrlExclusions, decoder: ThreadPoolExecutor) -> tuple[str, int]:
    """Download, process and record one row; returns (outcome, bytes downloaded)."""
    if exclusions.excluded(row.url):
        job.record_failure(row.index, row.url, outcomes.EXCLUDED, "excluded URL")
        return outcomes.EXCLUDED, 0
    try:
        download = await downloader.get(row.url)
    except FetchFailure as failure:
        job.record_failure(row.index, row.url, failure.outcome, failure.detail)
        return failure.outcome, 0
    nbytes = len(download.body)
    try:
        image = await asyncio.get_running_loop().run_in_executor(decoder, normalize_image, download.body, cfg.image)
    except ImageRejected as rejected:
        job.record_failure(row.index, row.url, rejected.cause, rejected.detail)
        return rejected.cause, nbytes
    meta = {
        "width": image.width,
        "height": image.height,
        "original_width": image.original_width,
        "original_height": image.original_height,
        "bytes": len(image.jpeg),
        "downloaded_bytes": nbytes,
    }
    if download.url != row.url:
        meta["final_url"] = download.url
    job.record_ok(row.index, row.url, row.caption, image.jpeg, meta)
    return outcomes.OK, nbytes
