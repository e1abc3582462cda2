"""Every option of a fetch run, typed and validated before any work starts."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from gitcli.errors import GitcapError
from gitcli.formats.cc import TsvLayout
from gitcli.formats.images import RESIZE_MODES, ImageSettings

OUTPUT_FORMATS = ("webdataset", "files")
# img2dataset's default list: these directives say "do not use this image for AI/indexing"
DEFAULT_DISALLOWED_ROBOTS = ("noai", "noimageai", "noindex", "noimageindex")


def default_processes() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class FetchConfig:
    tsv: Path
    out: Path
    layout: TsvLayout = field(default_factory=TsvLayout)
    output_format: str = "webdataset"
    shard_size: int = 10_000
    image: ImageSettings = field(default_factory=ImageSettings)
    processes: int = field(default_factory=default_processes)  # 0 = decode in the main process
    concurrency: int = 128  # requests in flight overall
    per_host: int = 16  # requests in flight to one host
    timeout: float = 10.0  # connect and read timeouts, seconds
    retries: int = 2
    retry_backoff: float = 1.0  # first backoff in seconds, doubled each retry, plus jitter
    max_retry_after: float = 60.0  # a longer Retry-After is not waited for (row stays transient)
    max_bytes: int = 20_000_000
    max_redirects: int = 10
    disallowed_robots: tuple[str, ...] = DEFAULT_DISALLOWED_ROBOTS
    allow_addresses: tuple[str, ...] = ()
    allow_private_addresses: bool = False
    exclude_urls: Path | None = None
    part: tuple[int, int] = (1, 1)  # this machine's slice I of N (1-based)
    retry_failed: bool = False
    user_agent_token: str = ""
    progress: bool = True

    def validate(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise GitcapError(f"unknown --format {self.output_format!r}; choose {' or '.join(OUTPUT_FORMATS)}")
        if self.image.mode not in RESIZE_MODES:
            raise GitcapError(f"unknown --resize-mode {self.image.mode!r}; choose one of {', '.join(RESIZE_MODES)}")
        if self.image.mode == "center-crop" and self.image.resize <= 0:
            raise GitcapError("--resize-mode center-crop needs --resize N")
        if not 1 <= self.image.jpeg_quality <= 100:
            raise GitcapError("--jpeg-quality must be between 1 and 100")
        if self.shard_size < 1:
            raise GitcapError("--shard-size must be at least 1")
        if self.concurrency < 1 or self.per_host < 1:
            raise GitcapError("--concurrency and --per-host must be at least 1")
        if self.processes < 0:
            raise GitcapError("--processes must be >= 0 (0 decodes in the main process)")
        if self.timeout <= 0:
            raise GitcapError("--timeout must be positive")
        if self.retries < 0:
            raise GitcapError("--retries must be >= 0")
        if self.max_bytes < 1:
            raise GitcapError("--max-bytes must be positive")
        i, n = self.part
        if not (n >= 1 and 1 <= i <= n):
            raise GitcapError(f"--part {i}/{n}: I must be between 1 and N")
        for a in self.allow_addresses:
            parse_network(a)
        if self.exclude_urls is not None and not Path(self.exclude_urls).is_file():
            raise GitcapError(f"--exclude-urls file not found: {self.exclude_urls}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise GitcapError(f"--out {self.out} exists and is not a folder")


def parse_part(text: str) -> tuple[int, int]:
    """`"2/8"` -> (2, 8)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise GitcapError(f"--part must look like I/N (e.g. 1/4), got {text!r}") from None
    return i, n


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise GitcapError(f"--allow-address {text!r} is not an IP address or CIDR block") from None
