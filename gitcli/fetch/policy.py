"""Which requests gitcap may make, and which answers it must not use.

Safety: by default no request goes to a private, loopback, link-local, multicast,
reserved or otherwise non-public address. The check runs on the URL's host when it is an
IP literal (aiohttp does not resolve those) and, through `GuardedResolver`, on every
address a name resolves to, so it holds for every redirect hop and cannot be dodged with
a name that points inside. `--allow-address` / `--allow-private-addresses` open it up.

Politeness: X-Robots-Tag opt-outs, and URLs that must never be fetched.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path
from typing import Iterable

from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from gitcli.fetch import outcomes
from gitcli.fetch.config import parse_network
from gitcli.fetch.outcomes import FetchFailure

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# The two known offensive rows of the CC3M training TSV are served through an .onion
# proxy; the whole domain is skipped rather than two exact strings that might be re-encoded.
EXCLUDED_HOST_SUFFIXES = (".onion.link",)

# directives that contain a colon themselves, so "x: y" is not always "user-agent: directives"
_DIRECTIVES_WITH_VALUE = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


class BlockedAddress(OSError):
    """Raised by the resolver; an OSError so aiohttp wraps it like any DNS failure."""

    def __init__(self, host: str, address: str):
        super().__init__(f"{host} resolves to non-public address {address}")
        self.host = host
        self.address = address


class AddressPolicy:
    def __init__(self, allowed: Iterable[str] = (), allow_private: bool = False):
        self.allowed = [parse_network(a) for a in allowed]
        self.allow_private = allow_private

    def allows(self, ip: IPAddress) -> bool:
        if self.allow_private:
            return True
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return self.allows(ip.ipv4_mapped)  # ::ffff:127.0.0.1 is loopback too
        return ip.is_global and not ip.is_multicast

    def check_url(self, url: URL) -> None:
        """Before each hop: a fetchable scheme and, for IP literals, an allowed address."""
        if url.scheme not in ("http", "https") or not url.host:
            raise FetchFailure(outcomes.BAD_URL, f"not an http(s) URL: {str(url)[:200]}")
        try:
            ip = ipaddress.ip_address(url.host)
        except ValueError:
            return  # a name: the resolver checks every address it resolves to
        if not self.allows(ip):
            raise FetchFailure(outcomes.BLOCKED_ADDRESS, f"{ip} is not a public address")


class GuardedResolver(AbstractResolver):
    """Resolves with the system resolver, then refuses the host if any of its addresses
    is not allowed (one bad address is enough: the connector may pick any of them)."""

    def __init__(self, policy: AddressPolicy):
        self._inner = ThreadedResolver()
        self._policy = policy

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        results = await self._inner.resolve(host, port, family)
        for r in results:
            address = r["host"]
            if not self._policy.allows(ipaddress.ip_address(address.split("%")[0])):
                raise BlockedAddress(host, address)
        return results

    async def close(self) -> None:
        await self._inner.close()


def robots_opt_out(values: Iterable[str], disallowed: Iterable[str], agent: str = "gitcap") -> bool:
    """True if an X-Robots-Tag value forbids use. `otherbot: noai` only binds otherbot;
    `gitcap: noai` and plain `noai` bind us."""
    banned = {d.lower() for d in disallowed}
    if not banned:
        return False
    for value in values:
        directives = value
        prefix, sep, rest = value.partition(":")
        name = prefix.strip().lower()
        if sep and "," not in prefix and name not in _DIRECTIVES_WITH_VALUE:
            if name not in (agent.lower(), "*"):
                continue
            directives = rest
        if {d.strip().lower() for d in directives.split(",")} & banned:
            return True
    return False


class UrlExclusions:
    """Built-in exclusions plus `--exclude-urls FILE` (one URL per line, # comments)."""

    def __init__(self, path: Path | None = None):
        self.urls: set[str] = set()
        if path is not None:
            with open(path, encoding="utf-8") as f:
                self.urls = {s for line in f if (s := line.strip()) and not s.startswith("#")}

    def excluded(self, url: str) -> bool:
        if url in self.urls:
            return True
        try:
            host = (URL(url).host or "").lower().rstrip(".")
        except ValueError:
            return False
        return any(host.endswith(sfx) or host == sfx[1:] for sfx in EXCLUDED_HOST_SUFFIXES)
