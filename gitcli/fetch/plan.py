"""Which shards and rows a run fetches: resume, `--part I/N`, `--retry-failed` and
rows that an option refused.

Rows are grouped by shard as the TSV streams past (shard = row // shard size). A shard is
skipped when its stats file exists (complete), unless some of its rows are worth asking
again: `--retry-failed` asks for rows whose outcome was transient, and every run asks
again for rows that an option refused (a blocked address, over `--max-bytes`...) when
the options are now looser than the ones the shard's stats recorded. An incomplete
shard, or a complete one whose rows in the TSV are not those it was fetched from, is
fetched again from scratch.
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
        "timeout": cfg.timeout,
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
    if now["timeout"] > old["timeout"]:
        changed.add(outcomes.TIMEOUT)  # transient too: --retry-failed also asks again
    return changed


@dataclass
class ShardPlan:
    shard_id: int
    # None: fetch every row from scratch; else only these rows, keeping the rest
    retry_rows: set[int] | None = None
    old_status: list[dict] = field(default_factory=list)
    rows_digest: str = ""  # of the TSV rows this shard holds: recorded in its stats

    def wants(self, row: int) -> bool:
        return self.retry_rows is None or row in self.retry_rows


def in_part(shard_id: int, part: tuple[int, int]) -> bool:
    """Shards are dealt round-robin to the N parts: deterministic, balanced, and it
    needs no row count up front (the TSV is streamed)."""
    i, n = part
    return shard_id % n == i - 1


def rows_digest(rows: Iterable[Row]) -> str:
    """What a shard was fetched from: its rows' numbers, captions and URLs. A rerun whose
    TSV (or --url-column, --caption-column, --header) gives other rows for a complete
    shard fetches it again instead of trusting it."""
    h = hashlib.sha256()
    for r in rows:
        h.update(f"{r.index}\t{r.caption}\t{r.url}\n".encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:16]


def rows_by_shard(rows: Iterable[Row], shard_size: int) -> Iterator[tuple[int, list[Row]]]:
    """Consecutive rows grouped by shard: one shard's rows in memory at a time."""
    batch: list[Row] = []
    for row in rows:
        if batch and row.index // shard_size != batch[0].index // shard_size:
            yield batch[0].index // shard_size, batch
            batch = []
        batch.append(row)
    if batch:
        yield batch[0].index // shard_size, batch


class Planner:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.complete = set(complete_shards(cfg.out))
        self._limits = limits(cfg)
        self._plans: dict[int, ShardPlan | None] = {}

    def plan(self, shard_id: int, rows: list[Row]) -> ShardPlan | None:
        if shard_id not in self._plans:
            self._plans[shard_id] = self._make_plan(shard_id, rows)
        return self._plans[shard_id]

    def _make_plan(self, shard_id: int, rows: list[Row]) -> ShardPlan | None:
        digest = rows_digest(rows)
        if shard_id not in self.complete:
            return ShardPlan(shard_id, rows_digest=digest)
        stats = read_stats(self.cfg.out, shard_id)
        if stats.get("rows_digest", digest) != digest:
            return ShardPlan(shard_id, rows_digest=digest)  # fetched from other rows: stale
        revisit = loosened(stats.get("limits"), self._limits) & set(stats.get("outcomes", {}))
        if not revisit and not self.cfg.retry_failed:
            return None  # the usual case: the stats file alone says there is nothing to do
        status = read_status(self.cfg.out, shard_id)
        retry = {int(line["key"]) for line in status
                 if line["outcome"] in revisit or (self.cfg.retry_failed and is_transient(line["outcome"]))}
        return ShardPlan(shard_id, retry, status, digest) if retry else None

    def shards(self, rows: Iterable[Row]) -> Iterator[tuple[ShardPlan, list[Row]]]:
        """Each shard this run works on, with its rows to fetch (possibly none: the
        shard is still finished, e.g. rewritten without rows that left the TSV)."""
        for shard_id, shard_rows in rows_by_shard(rows, self.cfg.shard_size):
            if not in_part(shard_id, self.cfg.part):
                continue
            plan = self.plan(shard_id, shard_rows)
            if plan is not None:
                yield plan, [row for row in shard_rows if plan.wants(row.index)]

    def count(self, rows: Iterable[Row]) -> int:
        """Rows this run will fetch (for the progress bar's total and ETA)."""
        return sum(len(batch) for _, batch in self.shards(rows))


def shards_with_rows(planner: Planner, rows: Iterable[Row]) -> Iterator[tuple[ShardPlan, list[Row]]]:
    """Each shard to work on with its rows to fetch; one shard's rows in memory at a time."""
    return planner.shards(rows)
