"""`gitcap fetch`: thin typer wrapper around `gitcli.fetch.fetch`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from gitcli.cli.common import console, fail, out_console, output_dir, user_errors


@user_errors
def fetch(
    tsv: Annotated[Path, typer.Argument(help="Caption TSV (caption<TAB>url, no header); .gz too.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder for shards (or image files).")],
    output_format: Annotated[str, typer.Option("--format", help="webdataset (tar shards) or files (<out>/%08d.jpg).")] = "webdataset",
    shard_size: Annotated[int, typer.Option("--shard-size", help="Rows per shard (NNNNN.tar = first row // shard size).")] = 10_000,
    resize: Annotated[int, typer.Option("--resize", min=0, help="Target shortest side (square side for center-crop); 0 keeps the size.")] = 0,
    resize_mode: Annotated[str, typer.Option("--resize-mode", help="keep-ratio, center-crop or none.")] = "keep-ratio",
    jpeg_quality: Annotated[int, typer.Option("--jpeg-quality", help="Quality of re-encoded JPEGs.")] = 95,
    max_pixels: Annotated[int, typer.Option("--max-pixels", help="Refuse images with more pixels (checked before decoding).")] = 50_000_000,
    processes: Annotated[Optional[int], typer.Option("--processes", help="Image worker processes (default: all cores; 0 = main process).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Requests in flight overall.")] = 128,
    per_host: Annotated[int, typer.Option("--per-host", help="Requests in flight to one host.")] = 16,
    timeout: Annotated[float, typer.Option("--timeout", help="Connect and read timeout, seconds.")] = 10.0,
    retries: Annotated[int, typer.Option("--retries", help="Retries of timeouts, connection errors, 5xx and 429.")] = 2,
    retry_backoff: Annotated[float, typer.Option("--retry-backoff", help="First retry delay in seconds (doubles, with jitter).")] = 1.0,
    max_bytes: Annotated[int, typer.Option("--max-bytes", help="Abandon bodies larger than this.")] = 20_000_000,
    disallowed_robots: Annotated[str, typer.Option("--disallowed-x-robots-tags", help="Comma list of X-Robots-Tag directives that opt an image out ('' = none).")] = "noai,noimageai,noindex,noimageindex",
    allow_address: Annotated[Optional[list[str]], typer.Option("--allow-address", help="Allow this non-public address or CIDR (repeatable).")] = None,
    allow_private_addresses: Annotated[bool, typer.Option("--allow-private-addresses", help="Allow every private/loopback address (LAN mirrors).")] = False,
    exclude_urls: Annotated[Optional[Path], typer.Option("--exclude-urls", help="File of URLs never to fetch, one per line.")] = None,
    part: Annotated[str, typer.Option("--part", help="I/N: fetch this machine's share of whole shards.")] = "1/1",
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help="Re-fetch rows of complete shards whose failure was transient.")] = False,
    url_column: Annotated[str, typer.Option("--url-column", help="URL column: 0-based index, or a name with --header.")] = "1",
    caption_column: Annotated[str, typer.Option("--caption-column", help="Caption column: index, name, or none.")] = "0",
    header: Annotated[bool, typer.Option("--header", help="The first line is a header.")] = False,
    user_agent_token: Annotated[str, typer.Option("--user-agent-token", help="Appended to gitcap's User-Agent (e.g. a contact).")] = "",
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No live progress bar.")] = False,
) -> None:
    """Download the images of a caption TSV into resumable tar shards.

    Re-run the same command to resume: complete shards are skipped; rows
    an option refused (blocked address, --max-bytes, --max-pixels, ...)
    are fetched again once the options allow them. Exits 1 when no row
    of the run succeeded.

    [bold]Example:[/]  gitcap fetch Train_GCC-training.tsv --out data/cc3m/train --resize 256
    """
    from gitcli.fetch import FetchConfig
    from gitcli.fetch import fetch as run_fetch
    from gitcli.fetch.config import default_processes, parse_part
    from gitcli.fetch.report import nothing_fetched, outcome_table
    from gitcli.formats.cc import TsvLayout
    from gitcli.formats.images import ImageSettings

    cfg = FetchConfig(
        tsv=tsv,
        out=out,
        layout=TsvLayout(caption_column=caption_column, url_column=url_column, header=header),
        output_format=output_format,
        shard_size=shard_size,
        image=ImageSettings(resize=resize, mode=resize_mode, jpeg_quality=jpeg_quality, max_pixels=max_pixels),
        processes=default_processes() if processes is None else processes,
        concurrency=concurrency,
        per_host=per_host,
        timeout=timeout,
        retries=retries,
        retry_backoff=retry_backoff,
        max_bytes=max_bytes,
        disallowed_robots=tuple(d.strip() for d in disallowed_robots.split(",") if d.strip()),
        allow_addresses=tuple(allow_address or ()),
        allow_private_addresses=allow_private_addresses,
        exclude_urls=exclude_urls,
        part=parse_part(part),
        retry_failed=retry_failed,
        user_agent_token=user_agent_token,
        progress=not no_progress,
    )
    output_dir(out)
    summary = run_fetch(cfg, console=console)
    # the outcome table and the dataset's totals are the command's result: stdout
    out_console.print(outcome_table(summary.outcomes, f"this run: {summary.rows:,} rows in {summary.seconds:.1f}s "
                                    f"({summary.ok / max(summary.seconds, 1e-9):,.0f} images/s)"))
    o = summary.overall
    out_console.print(f"dataset {out}: {o['shards']} complete shards, {o['ok']:,}/{o['rows']:,} images "
                      f"({100 * o['success_rate']:.1f}%); stats in {out / 'stats.json'}")
    problem = nothing_fetched(summary.outcomes, cfg)
    if problem:  # a run that produced nothing must not look like a success to a script
        raise fail(problem, code=1)
