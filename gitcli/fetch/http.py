"""The HTTP side: one aiohttp session, redirects followed by hand, retries, size limits.

Redirects are followed here rather than by aiohttp so that every hop's URL passes
`AddressPolicy.check_url` (its name still goes through `GuardedResolver`). Bodies are
streamed and abandoned as soon as they pass `--max-bytes`.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from gitcli import __version__
from gitcli.fetch import outcomes
from gitcli.fetch.config import FetchConfig
from gitcli.fetch.outcomes import FetchFailure
from gitcli.fetch.policy import AddressPolicy, BlockedAddress, GuardedResolver, robots_opt_out

REDIRECT_CODES = (301, 302, 303, 307, 308)
CHUNK = 1 << 16


def user_agent(token: str = "") -> str:
    ua = f"gitcap/{__version__} (image-caption dataset downloader; honours X-Robots-Tag noai, noimageai)"
    return f"{ua} {token}".strip()


@dataclass
class Download:
    body: bytes
    url: str  # the final URL after redirects
    attempts: int


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: a number or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Downloader:
    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg
        self.policy = AddressPolicy(cfg.allow_addresses, cfg.allow_private_addresses)
        self.bytes_received = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "Downloader":
        connector = aiohttp.TCPConnector(
            limit=self.cfg.concurrency,
            limit_per_host=self.cfg.per_host,
            use_dns_cache=True,
            ttl_dns_cache=300,
            resolver=GuardedResolver(self.policy),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers={"User-Agent": user_agent(self.cfg.user_agent_token)},
            cookie_jar=aiohttp.DummyCookieJar(),  # no tracking state between unrelated rows
            trust_env=False,
            # connect and read timeouts per socket operation; `total` stops a trickling
            # server from holding a slot forever
            timeout=aiohttp.ClientTimeout(
                total=self.cfg.timeout * 6, sock_connect=self.cfg.timeout, sock_read=self.cfg.timeout
            ),
        )
        return self

    async def __aexit__(self, *exc) -> None:
        if self._session is not None:
            await self._session.close()

    async def get(self, url: str) -> Download:
        """The body of `url`, retrying transient failures with backoff; raises FetchFailure."""
        attempt = 0
        while True:
            attempt += 1
            try:
                body, final = await self._get_once(url)
                return Download(body, final, attempt)
            except FetchFailure as failure:
                if not failure.transient or attempt > self.cfg.retries:
                    raise
                delay = failure.retry_after
                if delay is None:
                    # exponential backoff with full jitter: many rows failing together
                    # (a host hiccup) do not come back in lockstep
                    delay = self.cfg.retry_backoff * (2 ** (attempt - 1)) * (0.5 + random.random())
                elif delay > self.cfg.max_retry_after:
                    raise  # the server asked for a long pause: leave it for --retry-failed
                await asyncio.sleep(delay)

    async def _get_once(self, url: str) -> tuple[bytes, str]:
        assert self._session is not None
        try:
            current = URL(url)
        except ValueError as exc:
            raise FetchFailure(outcomes.BAD_URL, str(exc)) from None
        for _hop in range(self.cfg.max_redirects + 1):
            self.policy.check_url(current)
            try:
                async with self._session.get(current, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_CODES:
                        location = resp.headers.get("Location")
                        if not location:
                            raise FetchFailure(outcomes.http_status(resp.status), "redirect without Location")
                        try:
                            current = resp.url.join(URL(location))
                        except ValueError as exc:
                            raise FetchFailure(outcomes.BAD_URL, f"bad redirect: {exc}") from None
                        continue
                    if resp.status != 200:
                        raise FetchFailure(
                            outcomes.http_status(resp.status),
                            resp.reason or "",
                            retry_after=parse_retry_after(resp.headers.get("Retry-After"))
                            if resp.status in (429, 503) else None,
                        )
                    if robots_opt_out(resp.headers.getall("X-Robots-Tag", []), self.cfg.disallowed_robots):
                        raise FetchFailure(outcomes.OPTED_OUT, resp.headers.get("X-Robots-Tag", ""))
                    return await self._read_body(resp), str(current)
            except FetchFailure:
                raise
            except aiohttp.ClientConnectorError as exc:
                raise _connector_failure(exc) from None
            except asyncio.TimeoutError as exc:  # ServerTimeoutError, ConnectionTimeoutError too
                raise FetchFailure(outcomes.TIMEOUT, str(exc) or "timed out") from None
            except (aiohttp.InvalidURL, ValueError) as exc:
                raise FetchFailure(outcomes.BAD_URL, str(exc)[:200]) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise FetchFailure(outcomes.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"[:200]) from None
        raise FetchFailure(outcomes.TOO_MANY_REDIRECTS, f"more than {self.cfg.max_redirects}")

    async def _read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        limit = self.cfg.max_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raise FetchFailure(outcomes.TOO_LARGE, f"Content-Length {resp.content_length} > {limit}")
        body = bytearray()
        async for chunk in resp.content.iter_chunked(CHUNK):
            body += chunk
            if len(body) > limit:
                # leaving the `async with` closes the connection: the rest is never read
                self.bytes_received += len(body)
                raise FetchFailure(outcomes.TOO_LARGE, f"body over {limit} bytes")
        self.bytes_received += len(body)
        return bytes(body)


def _connector_failure(exc: aiohttp.ClientConnectorError) -> FetchFailure:
    cause = exc.os_error
    if isinstance(cause, BlockedAddress) or isinstance(exc.__cause__, BlockedAddress):
        blocked = cause if isinstance(cause, BlockedAddress) else exc.__cause__
        return FetchFailure(outcomes.BLOCKED_ADDRESS, str(blocked))
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return FetchFailure(outcomes.DNS_ERROR, str(exc)[:200])
    return FetchFailure(outcomes.CONNECTION_ERROR, str(exc)[:200])
