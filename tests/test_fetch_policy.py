"""The address policy against IPv6 forms that carry an IPv4 address: each form judged by
the IPv4 address inside it, for literals, for resolved AAAA records and on redirects."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest
from aiohttp import web
from support.fetch import LoopbackServer, image_bytes, status_by_key, write_tsv
from yarl import URL

from gitcli.fetch import FetchConfig, fetch
from gitcli.fetch.outcomes import FetchFailure
from gitcli.fetch.policy import AddressPolicy, BlockedAddress, GuardedResolver

# (form, refused: carries 169.254.169.254 or another non-public address, allowed: carries 8.8.8.8)
FORMS = [
    ("NAT64 64:ff9b::/96", "64:ff9b::a9fe:a9fe", "64:ff9b::808:808"),
    ("IPv4-compatible ::a.b.c.d", "::a9fe:a9fe", "::808:808"),
    ("IPv4-mapped ::ffff:a.b.c.d", "::ffff:a9fe:a9fe", "::ffff:808:808"),
    ("IPv4-translated ::ffff:0:a.b.c.d", "::ffff:0:a9fe:a9fe", "::ffff:0:808:808"),
    ("6to4 2002::/16", "2002:a9fe:a9fe::1", "2002:808:808::1"),
    # Teredo: server 65.54.227.120, client (obfuscated) 192.0.2.45 / 8.8.8.8
    ("Teredo 2001::/32", "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:0:4136:e378:8000:63bf:f7f7:f7f7"),
]
# no IPv4 address can be read off these: refused whatever the bits say
ALWAYS_REFUSED = ["64:ff9b:1::808:808", "64:ff9b:1::a9fe:a9fe", "fec0::1", "fec0::808:808"]


def ip(text: str) -> ipaddress.IPv6Address:
    return ipaddress.IPv6Address(text)


@pytest.mark.parametrize("form, refused, allowed", FORMS, ids=[f[0] for f in FORMS])
def test_embedded_ipv4_is_judged_by_the_same_rules(form, refused, allowed):
    policy = AddressPolicy()
    assert not policy.allows(ip(refused))
    assert policy.allows(ip(allowed))
    with pytest.raises(FetchFailure) as caught:
        policy.check_url(URL(f"http://[{refused}]/x.jpg"))
    assert caught.value.outcome == "blocked_address"
    policy.check_url(URL(f"http://[{allowed}]/x.jpg"))  # no exception


@pytest.mark.parametrize("address", ALWAYS_REFUSED)
def test_local_use_nat64_and_site_local_are_refused(address):
    assert ip(address).is_global  # what ipaddress alone would have let through
    assert not AddressPolicy().allows(ip(address))


def test_nat64_of_the_metadata_address_was_global_for_ipaddress():
    # the reason for the whole check: ipaddress calls these global
    assert ip("64:ff9b::a9fe:a9fe").is_global and ip("::ffff:0:a9fe:a9fe").is_global


def test_allow_address_and_allow_private_still_open_the_forms():
    metadata_nat64 = ip("64:ff9b::a9fe:a9fe")
    # allowing the IPv4 address allows it inside any form
    assert AddressPolicy(["169.254.169.254"]).allows(metadata_nat64)
    assert AddressPolicy(["169.254.0.0/16"]).allows(ip("2002:a9fe:a9fe::1"))
    # allowing the IPv6 block itself works too, refused forms included
    assert AddressPolicy(["64:ff9b::/96"]).allows(metadata_nat64)
    assert AddressPolicy(["fec0::/10"]).allows(ip("fec0::1"))
    assert not AddressPolicy(["fec0::/10"]).allows(ip("64:ff9b:1::1"))
    # an allowance for one address does not open another
    assert not AddressPolicy(["169.254.169.253"]).allows(metadata_nat64)
    everything = AddressPolicy(allow_private=True)
    assert all(everything.allows(ip(a)) for a in ALWAYS_REFUSED + [f[1] for f in FORMS])


class FakeResolver:
    def __init__(self, addresses):
        self.addresses = addresses

    async def resolve(self, host, port=0, family=0):
        return [{"hostname": host, "host": a, "port": port, "family": 10, "proto": 0, "flags": 0}
                for a in self.addresses]

    async def close(self):
        pass


def resolve(policy: AddressPolicy, addresses: list[str]) -> list[str]:
    """What GuardedResolver lets through when the name's records are `addresses`."""
    async def go():
        resolver = GuardedResolver(policy)  # aiohttp's resolver needs a running loop
        resolver._inner = FakeResolver(addresses)
        return [r["host"] for r in await resolver.resolve("images.example", 80)]
    return asyncio.run(go())


@pytest.mark.parametrize("form, refused, allowed", FORMS, ids=[f[0] for f in FORMS])
def test_resolved_aaaa_records_are_judged_too(form, refused, allowed):
    assert resolve(AddressPolicy(), [allowed]) == [allowed]
    with pytest.raises(BlockedAddress, match="non-public"):
        resolve(AddressPolicy(), [allowed, refused])  # one bad record is enough
    assert resolve(AddressPolicy(["169.254.169.254", "192.0.2.45", "65.54.227.120"]), [refused]) == [refused]


def test_literals_and_redirects_to_embedding_forms_are_blocked(tmp_path):
    inside = LoopbackServer("127.0.0.1")
    other = LoopbackServer("127.0.0.2")
    try:
        inside.add_bytes("/secret.jpg", image_bytes())
        targets = [f"http://[64:ff9b::7f00:1]:{inside.port}/secret.jpg",
                   f"http://[::ffff:0:7f00:1]:{inside.port}/secret.jpg",
                   f"http://[::7f00:1]:{inside.port}/secret.jpg",
                   f"http://[2002:7f00:1::1]:{inside.port}/secret.jpg",
                   f"http://[fec0::1]:{inside.port}/secret.jpg"]

        def bounce_to(target):
            async def handler(request, n):
                raise web.HTTPFound(target)
            return handler

        rows = [("fine", other.add_bytes("/fine.jpg", image_bytes()))]
        rows += [(f"hop {i}", other.add(f"/bounce-{i}", bounce_to(t))) for i, t in enumerate(targets)]
        rows += [(f"literal {i}", t) for i, t in enumerate(targets)]
        tsv = write_tsv(tmp_path / "rows.tsv", rows)
        cfg = FetchConfig(tsv=tsv, out=tmp_path / "out", allow_addresses=("127.0.0.2",), processes=0,
                          retries=0, timeout=5.0, progress=False)
        fetch(cfg)
        status = status_by_key(tmp_path / "out")
        outcomes = [status[f"{i:09d}"]["outcome"] for i in range(len(rows))]
        assert outcomes == ["ok"] + ["blocked_address"] * (2 * len(targets))
        assert all(other.hits[f"/bounce-{i}"] == 1 for i in range(len(targets)))
        assert sum(inside.hits.values()) == 0
    finally:
        inside.close()
        other.close()
