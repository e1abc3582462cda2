"""Which shards and rows a run fetches: resume, `--part I/N`, `--retry-failed` and
rows that an option refused.

Rows are grouped by shard as the TSV streams past (shard = row // shard size). A shard is
skipped when its stats file exists (complete), unless some of its rows are worth asking
again: `--retry-failed` asks for rows whose outcome was transient, and every run asks
again for rows that an option refused (a blocked address, over `--max-bytes`...) when
the options are now looser than the ones the shard's stats recorded. An incomplete
shard is fetched again from scratch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from gitcli.fetch import outcomes
from gitcli.fetch.config import FetchConfig
from gitcli.fetch.outcomes import is_transient
from gitcli.formats.cc import Row
from gitcli.formats.shards import complete_shards, read_stats, read_status

def limits(cfg: FetchConfig) -> dict[str, Any]:
    """The options that decide the option-caused outcomes, as a shard's stats record them."""
    excluded = None
    if cfg.exclude_urls is not None:
        excluded = hashlib.sha256(Path(cfg.exclude_urls).read_bytes()).hexdigest()[:16]
    return {
        "allow_addresses": sorted(cfg.allow_addresses),
        "allow_private_addresses": cfg.allow_private_addresses,
        "max_bytes": cfg.max_bytes,
        "max_pixels": cfg.image.max_pixels,
        "disallowed_robots": sorted(d.lower() for d in cfg.disallowed_robots),
        "exclude_urls": excluded,
    }


def loosened(recorded: dict[str, Any] | None, now: dict[str, Any]) -> set[str]:
    """Option-caused outcomes that the options `now` may turn into something else."""
    # a shard finished by an older gitcap recorded no limits: it ran with the defaults
    old = {**limits(FetchConfig(tsv=Path(), out=Path())), **(recorded or {})}
    changed = set()
    if (now["allow_private_addresses"] and not old["allow_private_addresses"]) or \
            set(now["allow_addresses"]) - set(old["allow_addresses"]):
        changed.add(outcomes.BLOCKED_ADDRESS)
    if now["max_bytes"] > old["max_bytes"]:
        changed.add(outcomes.TOO_LARGE)
    if now["max_pixels"] > old["max_pixels"]:
        changed.add(outcomes.TOO_MANY_PIXELS)
    if set(old["disallowed_robots"]) - set(now["disallowed_robots"]):
        changed.add(outcomes.OPTED_OUT)
    if now["exclude_urls"] != old["exclude_urls"]:
        changed.add(outcomes.EXCLUDED)
    return changed


@dataclass
class ShardPlan:
    shard_id: int
    # None: fetch every row from scratch; else only these rows, keeping the rest
    retry_rows: set[int] | None = None
    old_status: list[dict] = field(default_factory=list)

    def wants(self, row: int) -> bool:
        return self.retry_rows is None or row in self.retry_rows


def in_part(shard_id: int, part: tuple[int, int]) -> bool:
    """Shards are dealt round-robin to the N parts: deterministic, balanced, and it
    needs no row count up front (the TSV is streamed)."""
    i, n = part
    return shard_id % n == i - 1


class Planner:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.complete = set(complete_shards(cfg.out))
        self._limits = limits(cfg)
        self._plans: dict[int, ShardPlan | None] = {}

    def plan(self, shard_id: int) -> ShardPlan | None:
        if shard_id not in self._plans:
            self._plans[shard_id] = self._make_plan(shard_id)
        return self._plans[shard_id]

    def _make_plan(self, shard_id: int) -> ShardPlan | None:
        if not in_part(shard_id, self.cfg.part):
            return None
        if shard_id not in self.complete:
            return ShardPlan(shard_id)
        stats = read_stats(self.cfg.out, shard_id)
        revisit = loosened(stats.get("limits"), self._limits) & set(stats.get("outcomes", {}))
        if not revisit and not self.cfg.retry_failed:
            return None  # the usual case: the stats file alone says there is nothing to do
        status = read_status(self.cfg.out, shard_id)
        retry = {int(line["key"]) for line in status
                 if line["outcome"] in revisit or (self.cfg.retry_failed and is_transient(line["outcome"]))}
        return ShardPlan(shard_id, retry, status) if retry else None

    def work(self, rows: Iterable[Row]) -> Iterator[tuple[ShardPlan, Row | None]]:
        """(plan, row) for each row to fetch, then (plan, None) once a shard's rows are
        over, so the shard can be finished when its last download lands."""
        size = self.cfg.shard_size
        current: ShardPlan | None = None
        for row in rows:
            shard_id = row.index // size
            if current is not None and current.shard_id != shard_id:
                yield current, None
                current = None
            plan = self.plan(shard_id)
            if plan is None:
                continue
            current = plan
            if plan.wants(row.index):
                yield plan, row
        if current is not None:
            yield current, None

    def count(self, rows: Iterable[Row]) -> int:
        """Rows this run will fetch (for the progress bar's total and ETA)."""
        return sum(1 for _, row in self.work(rows) if row is not None)


def shards_with_rows(planner: Planner, rows: Iterable[Row]) -> Iterator[tuple[ShardPlan, list[Row]]]:
    """Each shard to work on with its rows to fetch; one shard's rows in memory at a time."""
    batch: list[Row] = []
    for plan, row in planner.work(rows):
        if row is None:
            yield plan, batch
            batch = []
        else:
            batch.append(row)
