"""What can happen to a row, by name. The names appear in status files, stats and the
outcome table, so they are stable strings, not an enum's repr."""

from __future__ import annotations

OK = "ok"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"
DNS_ERROR = "dns_error"
BLOCKED_ADDRESS = "blocked_address"  # private/loopback/... address and not allowed
BAD_URL = "bad_url"
EXCLUDED = "excluded"  # built-in or --exclude-urls list
OPTED_OUT = "opted_out"  # X-Robots-Tag noai & co.
TOO_LARGE = "too_large"  # body over --max-bytes
TOO_MANY_PIXELS = "too_many_pixels"  # header dimensions over the limit (decompression bomb)
NOT_AN_IMAGE = "not_an_image"
DECODE_ERROR = "decode_error"  # an image format, but the data is corrupt or truncated
UNSUPPORTED_IMAGE = "unsupported_image"  # an image type or feature the decoder cannot handle in full
TOO_MANY_REDIRECTS = "too_many_redirects"


# Outcomes that an option decided, not the server: a rerun whose options now allow the
# row fetches it again, even in a complete shard (plan.py). Every other failure is final,
# except the transient ones below, which `--retry-failed` asks for again.
OPTION_CAUSED = {
    BLOCKED_ADDRESS: "--allow-address / --allow-private-addresses",
    TOO_LARGE: "--max-bytes",
    TOO_MANY_PIXELS: "--max-pixels",
    OPTED_OUT: "--disallowed-x-robots-tags",
    EXCLUDED: "--exclude-urls",
    TIMEOUT: "--timeout",
}


def http_status(code: int) -> str:
    return f"http_{code}"


def is_transient(outcome: str) -> bool:
    """Worth asking again later (in-run retries and --retry-failed): the server may answer
    next time. A 404, a blocked address or a broken image will not change."""
    if outcome in (TIMEOUT, CONNECTION_ERROR):
        return True
    if outcome.startswith("http_"):
        code = int(outcome[5:])
        return code == 429 or code >= 500
    return False


class FetchFailure(Exception):
    """A row could not be fetched; `outcome` is its recorded cause."""

    def __init__(self, outcome: str, detail: str = "", retry_after: float | None = None):
        super().__init__(outcome, detail)
        self.outcome = outcome
        self.detail = detail
        self.retry_after = retry_after

    @property
    def transient(self) -> bool:
        return is_transient(self.outcome)
