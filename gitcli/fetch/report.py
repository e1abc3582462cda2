"""What the user sees: a live progress bar while rows stream through (stderr), an outcome
table at the end (the CLI prints it on stdout), and `<out>/stats.json` summing every
complete shard of the dataset."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from gitcli.config import write_json
from gitcli.fetch import outcomes
from gitcli.formats.shards import complete_shards, read_stats
from gitcli.progress import ProgressBar

OVERALL_STATS = "stats.json"


class FetchProgress:
    """This run's outcome counts, shown live on the progress bar (rows, images/s,
    success rate, MB/s, time left)."""

    def __init__(self, console: Console | None, total: int, enabled: bool = True):
        self.counts: Counter[str] = Counter()
        self.bytes = 0
        self.started = time.time()
        self._bar = ProgressBar("fetch", total, unit="rows", enabled=enabled, console=console)
        self._last_refresh = 0.0

    def __enter__(self) -> "FetchProgress":
        self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._bar.show(self._bar.completed, self._rates())
        self._bar.__exit__(*exc)

    def row_done(self, outcome: str, nbytes: int) -> None:
        self.counts[outcome] += 1
        self.bytes += nbytes
        now = time.monotonic()
        if now - self._last_refresh > 0.25:  # formatting per row would cost more than the row
            self._last_refresh = now
            self._bar.advance(1, self._rates())
        else:
            self._bar.advance(1)

    def add_counts(self, counts: dict[str, int], nbytes: int) -> None:
        """Batched counts from a worker process."""
        self.counts.update(counts)
        self.bytes += nbytes
        self._bar.advance(sum(counts.values()), self._rates())

    def _rates(self) -> str:
        elapsed = max(time.time() - self.started, 1e-6)
        done = sum(self.counts.values())
        ok = self.counts.get(outcomes.OK, 0)
        return f"{ok / elapsed:,.0f} img/s · {100 * ok / done if done else 0:.0f}% ok · {self.bytes / elapsed / 1e6:.1f} MB/s"


def overall_stats(out: Path) -> dict[str, Any]:
    """Sum of every complete shard's stats in the folder (all parts, all runs)."""
    counts: Counter[str] = Counter()
    shards = complete_shards(out)
    rows = ok = nbytes = 0
    for shard_id in shards:
        s = read_stats(out, shard_id)
        rows += s["rows"]
        ok += s["ok"]
        nbytes += s.get("bytes_downloaded", 0)
        counts.update(s["outcomes"])
    return {
        "shards": len(shards),
        "rows": rows,
        "ok": ok,
        "failed": rows - ok,
        "success_rate": round(ok / rows, 4) if rows else 0.0,
        "outcomes": dict(counts.most_common()),
        "bytes_downloaded": nbytes,
    }


def write_overall_stats(out: Path) -> dict[str, Any]:
    stats = overall_stats(out)
    write_json(Path(out) / OVERALL_STATS, stats)
    return stats


_DESCRIPTIONS = {
    outcomes.OK: "downloaded and stored",
    outcomes.TIMEOUT: "no answer within --timeout",
    outcomes.CONNECTION_ERROR: "connection refused/reset",
    outcomes.DNS_ERROR: "name does not resolve",
    outcomes.BLOCKED_ADDRESS: "non-public address (see --allow-address)",
    outcomes.BAD_URL: "not an http(s) URL",
    outcomes.EXCLUDED: "on the exclusion list",
    outcomes.OPTED_OUT: "X-Robots-Tag opt-out",
    outcomes.TOO_LARGE: "body over --max-bytes",
    outcomes.TOO_MANY_PIXELS: "dimensions over the pixel limit",
    outcomes.NOT_AN_IMAGE: "not an image (e.g. an HTML page)",
    outcomes.DECODE_ERROR: "corrupt or truncated image",
    outcomes.UNSUPPORTED_IMAGE: "an image type or feature gitcap cannot decode",
    outcomes.TOO_MANY_REDIRECTS: "redirect loop",
}


def outcome_table(counts: Counter[str] | dict[str, int], title: str) -> Table:
    total = sum(counts.values())
    table = Table(title=title)
    table.add_column("outcome")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    table.add_column("meaning")
    for name, n in sorted(counts.items(), key=lambda kv: (kv[0] != outcomes.OK, -kv[1])):
        meaning = _DESCRIPTIONS.get(name, "HTTP status " + name[5:] if name.startswith("http_") else "")
        if name.startswith("http_") and outcomes.is_transient(name):
            meaning += " (transient: --retry-failed)"
        table.add_row(name, f"{n:,}", f"{100 * n / total:.1f}%" if total else "-", meaning)
    return table


def _fix(outcome: str, cfg: Any) -> str:
    """What the user can do when most rows ended with `outcome`."""
    if outcome == outcomes.BLOCKED_ADDRESS:
        return ("the URLs resolve to private or otherwise non-public addresses; for a LAN mirror pass "
                "--allow-private-addresses or --allow-address CIDR and run the same command again")
    if outcome == outcomes.TOO_LARGE:
        return f"the bodies are over --max-bytes {cfg.max_bytes:,}; raise it and run the same command again"
    if outcome == outcomes.TOO_MANY_PIXELS:
        return (f"the images are over --max-pixels {cfg.image.max_pixels:,}; raise it and run the same "
                "command again")
    if outcome == outcomes.OPTED_OUT:
        return "the servers opt these images out with X-Robots-Tag (see --disallowed-x-robots-tags)"
    if outcome == outcomes.EXCLUDED:
        return "the URLs are on the exclusion list (built-in, or --exclude-urls)"
    if outcome == outcomes.BAD_URL:
        return "the URL column holds no http(s) URLs; check --url-column (and --header)"
    if outcome == outcomes.DNS_ERROR:
        return "the host names do not resolve; check this machine's network and DNS"
    if outcomes.is_transient(outcome):
        return ("the servers did not answer in time or failed; check the network (or --timeout), "
                "then run again with --retry-failed")
    if outcome in (outcomes.NOT_AN_IMAGE, outcomes.DECODE_ERROR, outcomes.UNSUPPORTED_IMAGE):
        return "the URLs do not serve images gitcap can read; check --url-column"
    if outcome.startswith("http_"):
        return f"the servers answered HTTP {outcome[5:]}: the URLs are gone or refused"
    return _DESCRIPTIONS.get(outcome, outcome)


def nothing_fetched(counts: Counter[str] | dict[str, int], cfg: Any) -> str | None:
    """None when some row of this run succeeded (or there was nothing to do); else one
    line naming the most common cause and its fix."""
    total = sum(counts.values())
    if total == 0 or counts.get(outcomes.OK, 0):
        return None
    top, n = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
    share = f"all {total:,} rows" if n == total else f"no row of {total:,} succeeded; {n:,} rows"
    return f"{share} {top}: {_fix(top, cfg)}"
