"""`gitcap fetch`: download the images of a caption TSV into shards, politely and resumably.

A torch-free level-2 leaf: imports only `gitcli.formats`, `gitcli.config`, `gitcli.errors`
and the torch-free progress bar `gitcli.progress`.

Modules, one job each:
    config     FetchConfig: every option, validated
    outcomes   outcome names (what happened to a row) and which of them are transient
    policy     which addresses/URLs may be requested; X-Robots-Tag; excluded URLs
    http       aiohttp client: redirects followed by hand (each hop checked), retries, limits
    plan       which shards and rows this run fetches (resume, --part, --retry-failed)
    shard      one shard being written: samples, status lines, stats
    report     progress bar, outcome table, overall stats
    worker     worker processes: each fetches whole shards (own event loop, decoding threads)
    shard_fetch  one shard: download rows with bounded concurrency, normalise, write
    run        the orchestration: plans shards, deals them to workers, shows progress
"""

from gitcli.fetch.config import FetchConfig
from gitcli.fetch.run import FetchSummary, fetch

__all__ = ["FetchConfig", "FetchSummary", "fetch"]
