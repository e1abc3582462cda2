"""One shard being written: its samples go straight into the temporary tar (or image
files), its status lines stay in memory (small) until the shard is finished. Finishing
renames the tar, writes the status file, and writes the stats file last."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from gitcli import __version__
from gitcli.fetch import outcomes
from gitcli.fetch.config import FetchConfig
from gitcli.fetch.plan import ShardPlan, limits
from gitcli.formats.atomic import TMP_MARK
from gitcli.formats.shards import (
    FilesShardWriter,
    TarShardWriter,
    discard_stats,
    image_file_name,
    iter_tar,
    row_key,
    shard_name,
    stats_path,
    tar_path,
    write_stats,
    write_status,
)


def remove_stale_partials(cfg: FetchConfig, shard_id: int) -> None:
    """Temporary files a killed run left for this shard. Only this shard's: with --part,
    other machines may be writing other shards into the same folder right now."""
    name = shard_name(shard_id)
    for path in cfg.out.glob(f".{name}*{TMP_MARK}*"):
        path.unlink(missing_ok=True)
    if cfg.output_format == "files":
        first = shard_id * cfg.shard_size
        for path in cfg.out.glob(f".*.jpg{TMP_MARK}*"):
            stem = path.name[1:].split(".")[0]
            if stem.isdigit() and first <= int(stem) < first + cfg.shard_size:
                path.unlink(missing_ok=True)


class ShardJob:
    def __init__(self, cfg: FetchConfig, plan: ShardPlan):
        self.cfg = cfg
        self.plan = plan
        self.shard_id = plan.shard_id
        self.finished = False
        self.bytes_downloaded = 0
        self.started = time.time()
        self.status: dict[int, dict[str, Any]] = {int(s["key"]): s for s in plan.old_status}
        remove_stale_partials(cfg, self.shard_id)
        if cfg.output_format == "files":
            self.writer: TarShardWriter | FilesShardWriter = FilesShardWriter(cfg.out, self.shard_id)
        else:
            self.writer = TarShardWriter(cfg.out, self.shard_id)
            if plan.retry_rows is not None:
                # --retry-failed rewrites the shard: keep every sample it already has
                self.writer.copy_from(iter_tar(tar_path(cfg.out, self.shard_id)))

    def record_ok(self, row: int, url: str, caption: str, jpeg: bytes, meta: dict[str, Any]) -> None:
        key = row_key(row)
        self.writer.add(key, jpeg, caption, {"key": key, "url": url, "status": outcomes.OK, **meta})
        self.status[row] = {"key": key, "url": url, "outcome": outcomes.OK, "error": None}

    def record_failure(self, row: int, url: str, outcome: str, error: str) -> None:
        self.status[row] = {"key": row_key(row), "url": url, "outcome": outcome, "error": error or None}
        if self.cfg.output_format == "files":
            # an image left by an older, interrupted run must not outlive a failed row
            (self.cfg.out / image_file_name(row)).unlink(missing_ok=True)

    def finish(self) -> dict[str, Any]:
        if stats_path(self.cfg.out, self.shard_id).exists():
            # the stats file is what says "complete": drop it before the shard changes
            # (a retry, or a complete shard fetched again from other rows)
            discard_stats(self.cfg.out, self.shard_id)
        self.writer.commit()
        write_status(self.cfg.out, self.shard_id, self.status.values())
        counts = Counter(s["outcome"] for s in self.status.values())
        stats = {
            "shard": shard_name(self.shard_id),
            "format": self.cfg.output_format,
            "first_row": self.shard_id * self.cfg.shard_size,
            "rows": len(self.status),
            "ok": counts.get(outcomes.OK, 0),
            "failed": len(self.status) - counts.get(outcomes.OK, 0),
            "outcomes": dict(sorted(counts.items())),
            "bytes_downloaded": self.bytes_downloaded,
            "seconds": round(time.time() - self.started, 3),
            "retried_rows": len(self.plan.retry_rows) if self.plan.retry_rows is not None else 0,
            "limits": limits(self.cfg),  # what a rerun compares its options with
            "rows_digest": self.plan.rows_digest,  # ... and its TSV rows
            "gitcap_version": __version__,
        }
        write_stats(self.cfg.out, self.shard_id, stats)
        self.finished = True
        return stats

    def abort(self) -> None:
        """Interrupted: drop the temporary tar; finished shards are untouched."""
        if not self.finished:
            self.writer.abort()
