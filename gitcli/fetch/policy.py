"""Which requests gitcap may make, and which answers it must not use.

Safety: by default no request goes to a private, loopback, link-local, multicast,
reserved or otherwise non-public address, nor to an IPv6 form that carries one
(NAT64, 6to4, Teredo, IPv4-mapped/-compatible/-translated: the IPv4 address inside is
judged) or whose destination cannot be told (local-use NAT64, site-local). The check runs on the URL's host when it is an
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


_IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT, RFC 2765
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated `::a.b.c.d`
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")  # RFC 3056
_TEREDO = ipaddress.ip_network("2001::/32")  # RFC 4380
# Forms whose IPv4 address cannot be read off the address alone, refused outright:
# local-use NAT64 (RFC 8215: the operator picks where the IPv4 bits sit) and the
# deprecated site-local block, which `is_global` counts as global.
_REFUSED_FORMS = (ipaddress.ip_network("64:ff9b:1::/48"), ipaddress.ip_network("fec0::/10"))


def embedded_ipv4(ip: ipaddress.IPv6Address) -> tuple[ipaddress.IPv4Address, ...] | None:
    """The IPv4 addresses an IPv6 address carries, for the forms that route to them:
    None for an ordinary IPv6 address, () for a form that is refused whatever it holds."""
    if any(ip in net for net in _REFUSED_FORMS):
        return ()
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _IPV4_MAPPED or ip in _IPV4_TRANSLATED or ip in _NAT64_WELL_KNOWN or ip in _IPV4_COMPATIBLE:
        return (low32,)
    if ip in _SIX_TO_FOUR:
        return (ip.sixtofour,)  # type: ignore[return-value]
    if ip in _TEREDO:
        server, client = ip.teredo  # type: ignore[misc]
        return (server, client)
    return None


class AddressPolicy:
    def __init__(self, allowed: Iterable[str] = (), allow_private: bool = False):
        self.allowed = [parse_network(a) for a in allowed]
        self.allow_private = allow_private

    def allows(self, ip: IPAddress) -> bool:
        if self.allow_private:
            return True
        if any(ip.version == net.version and ip in net for net in self.allowed):
            return True
        if isinstance(ip, ipaddress.IPv6Address):
            embedded = embedded_ipv4(ip)
            if embedded is not None:
                # the packet ends up at the IPv4 address inside (a NAT64 gateway, a 6to4
                # relay...): judge that one, so 64:ff9b::a9fe:a9fe is 169.254.169.254
                return bool(embedded) and all(self.allows(v4) for v4 in embedded)
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
