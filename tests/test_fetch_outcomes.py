"""One row per server behaviour, each checked through the status file it leaves, and the
server's own request log (what reached it, how often)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import pytest
from aiohttp import web
from PIL import Image
from support.fetch import LoopbackServer, image_bytes, png_declaring, status_by_key, write_tsv

from gitcli.fetch import FetchConfig, fetch
from gitcli.formats.images import ImageSettings
from gitcli.formats.shards import complete_shards, iter_samples, read_stats


@pytest.fixture(scope="module")
def server():
    s = LoopbackServer("127.0.0.1")
    yield s
    s.close()


def run(tmp_path: Path, rows, **options) -> dict[str, dict]:
    opts = dict(allow_addresses=("127.0.0.1",), processes=0, retries=0, retry_backoff=0.01,
                timeout=5.0, progress=False, shard_size=100)
    opts.update(options)
    tsv = write_tsv(tmp_path / "rows.tsv", rows)
    cfg = FetchConfig(tsv=tsv, out=tmp_path / "out", **opts)
    fetch(cfg)
    return status_by_key(tmp_path / "out")


def outcome(status: dict[str, dict], row: int) -> str:
    return status[f"{row:09d}"]["outcome"]


def test_jpeg_png_webp_are_stored_as_resized_rgb_jpegs(server, tmp_path):
    urls = [
        server.add_bytes("/ok.jpg", image_bytes("JPEG", (400, 300))),
        server.add_bytes("/ok.png", image_bytes("PNG", (300, 400), mode="RGBA"), "image/png"),
        server.add_bytes("/ok.webp", image_bytes("WEBP", (200, 100)), "image/webp"),
    ]
    status = run(tmp_path, [(f"cap {i}", u) for i, u in enumerate(urls)], image=ImageSettings(resize=64))
    assert [outcome(status, i) for i in range(3)] == ["ok", "ok", "ok"]
    samples = {s.key: s for s in iter_samples(tmp_path / "out")}
    assert sorted(samples) == ["000000000", "000000001", "000000002"]
    expected = {"000000000": (85, 64), "000000001": (64, 85), "000000002": (128, 64)}
    for key, s in samples.items():
        im = Image.open(io.BytesIO(s.jpeg))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == expected[key] == (s.meta["width"], s.meta["height"])
        assert s.caption == f"cap {int(key)}"
        assert s.meta["url"] == urls[int(key)]
    # the request carried a User-Agent naming gitcap
    ua = [h["User-Agent"] for p, _, h in server.log if p == "/ok.jpg"][-1]
    assert ua.startswith("gitcap/")


def test_404_is_requested_once_and_not_retried(server, tmp_path):
    url = server.url("/gone-404")
    before = server.hits["/gone-404"]
    status = run(tmp_path, [("x", url)], retries=3)
    assert outcome(status, 0) == "http_404"
    assert server.hits["/gone-404"] - before == 1


def test_500_then_200_is_retried_and_succeeds(server, tmp_path):
    body = image_bytes()

    async def flaky(request, n):
        return web.Response(status=500) if n == 1 else web.Response(body=body, content_type="image/jpeg")

    url = server.add("/flaky-500", flaky)
    status = run(tmp_path, [("x", url)], retries=2)
    assert outcome(status, 0) == "ok"
    assert server.hits["/flaky-500"] == 2


def test_500_without_retries_left_is_recorded_transient(server, tmp_path):
    async def always_500(request, n):
        return web.Response(status=503)

    url = server.add("/always-503", always_500)
    status = run(tmp_path, [("x", url)], retries=1)
    assert outcome(status, 0) == "http_503"
    assert server.hits["/always-503"] == 2


def test_429_waits_for_retry_after(server, tmp_path):
    body = image_bytes()

    async def limited(request, n):
        if n == 1:
            return web.Response(status=429, headers={"Retry-After": "1"})
        return web.Response(body=body, content_type="image/jpeg")

    url = server.add("/limited-429", limited)
    status = run(tmp_path, [("x", url)], retries=1, retry_backoff=0.0)
    assert outcome(status, 0) == "ok"
    times = [t for p, t, _ in server.log if p == "/limited-429"]
    assert len(times) == 2
    assert times[1] - times[0] >= 0.9  # honoured the header, not the (zero) backoff


def test_response_slower_than_timeout_is_a_timeout(server, tmp_path):
    async def slow(request, n):
        await asyncio.sleep(3)
        return web.Response(body=b"late")

    url = server.add("/slow", slow)
    status = run(tmp_path, [("x", url)], timeout=0.3)
    assert outcome(status, 0) == "timeout"


def test_redirect_chain_is_followed(server, tmp_path):
    async def hop(target):
        async def handler(request, n):
            raise web.HTTPFound(target)
        return handler

    server.add_bytes("/chain-end.jpg", image_bytes())
    server.add("/chain-1", asyncio.run(hop("/chain-2")))
    server.add("/chain-2", asyncio.run(hop(server.url("/chain-3"))))
    server.add("/chain-3", asyncio.run(hop("/chain-end.jpg")))
    server.add("/loop", asyncio.run(hop("/loop")))
    status = run(tmp_path, [("x", server.url("/chain-1")), ("y", server.url("/loop"))])
    assert outcome(status, 0) == "ok"
    assert outcome(status, 1) == "too_many_redirects"
    (sample,) = list(iter_samples(tmp_path / "out"))
    assert sample.meta["final_url"] == server.url("/chain-end.jpg")


def test_allowed_server_cannot_redirect_to_another_private_address(tmp_path):
    inside = LoopbackServer("127.0.0.1")
    other = LoopbackServer("127.0.0.2")
    try:
        inside.add_bytes("/secret.jpg", image_bytes())

        async def bounce(request, n):
            raise web.HTTPFound(inside.url("/secret.jpg"))

        other.add_bytes("/fine.jpg", image_bytes())
        other.add("/bounce", bounce)
        status = run(tmp_path, [("a", other.url("/fine.jpg")), ("b", other.url("/bounce"))],
                     allow_addresses=("127.0.0.2",))
        assert outcome(status, 0) == "ok"
        assert outcome(status, 1) == "blocked_address"
        assert other.hits["/bounce"] == 1
        assert sum(inside.hits.values()) == 0  # the refused hop never reached its server
    finally:
        inside.close()
        other.close()


def test_loopback_literal_and_localhost_refused_without_flags(server, tmp_path):
    server.add_bytes("/private.jpg", image_bytes())
    before = server.hits["/private.jpg"]
    rows = [("ip", server.url("/private.jpg")),
            ("name", f"http://localhost:{server.port}/private.jpg"),
            ("mapped", f"http://[::ffff:127.0.0.1]:{server.port}/private.jpg")]
    status = run(tmp_path, rows, allow_addresses=())
    assert [outcome(status, i) for i in range(3)] == ["blocked_address"] * 3
    assert server.hits["/private.jpg"] == before  # no request reached the server
    assert status["000000001"]["error"] and "localhost" in status["000000001"]["error"]


def test_allow_private_addresses_opens_loopback(server, tmp_path):
    url = server.add_bytes("/lan.jpg", image_bytes())
    status = run(tmp_path, [("x", url.replace("127.0.0.1", "localhost"))], allow_addresses=(),
                 allow_private_addresses=True)
    assert outcome(status, 0) == "ok"


def test_body_over_max_bytes_is_abandoned(server, tmp_path):
    big = image_bytes("PNG", (600, 600))

    async def chunked(request, n):
        # no Content-Length: the limit must hold while streaming
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        for i in range(0, len(big), 4096):
            await resp.write(big[i:i + 4096])
        await resp.write_eof()
        return resp

    rows = [("declared", server.add_bytes("/big.png", big, "image/png")),
            ("streamed", server.add("/big-chunked.png", chunked))]
    status = run(tmp_path, rows, max_bytes=len(big) // 4)
    assert outcome(status, 0) == "too_large"
    assert outcome(status, 1) == "too_large"


def test_html_page_with_200_is_not_an_image(server, tmp_path):
    url = server.add_bytes("/page.jpg", b"<html><body>Not here</body></html>", "text/html")
    status = run(tmp_path, [("x", url)])
    assert outcome(status, 0) == "not_an_image"
    assert not list(iter_samples(tmp_path / "out"))


def test_truncated_jpeg_is_a_decode_error(server, tmp_path):
    whole = image_bytes("JPEG", (640, 480))
    url = server.add_bytes("/truncated.jpg", whole[: len(whole) // 2])
    # without resize too: the pass-through path must still decode fully
    status = run(tmp_path, [("x", url)])
    assert outcome(status, 0) == "decode_error"


def test_png_declaring_huge_dimensions_is_refused_before_decoding(server, tmp_path):
    url = server.add_bytes("/bomb.png", png_declaring(100_000, 100_000), "image/png")
    status = run(tmp_path, [("x", url)], image=ImageSettings(resize=64))
    assert outcome(status, 0) == "too_many_pixels"


def test_x_robots_tag_noai_opts_out(server, tmp_path):
    jpg = image_bytes()
    rows = [("noai", server.add_bytes("/noai.jpg", jpg, headers={"X-Robots-Tag": "noai"})),
            ("ours", server.add_bytes("/ours.jpg", jpg, headers={"X-Robots-Tag": "gitcap: noimageai"})),
            ("other bot", server.add_bytes("/other.jpg", jpg, headers={"X-Robots-Tag": "otherbot: noai"})),
            ("harmless", server.add_bytes("/follow.jpg", jpg, headers={"X-Robots-Tag": "nofollow"}))]
    status = run(tmp_path, rows)
    assert [outcome(status, i) for i in range(4)] == ["opted_out", "opted_out", "ok", "ok"]
    # the list can be changed: with an empty list nothing opts out
    (tmp_path / "again").mkdir()
    status = run(tmp_path / "again", rows, disallowed_robots=())
    assert [outcome(status, i) for i in range(4)] == ["ok"] * 4


def test_excluded_urls_are_never_requested(server, tmp_path):
    url = server.add_bytes("/excluded.jpg", image_bytes())
    listed = tmp_path / "exclude.txt"
    listed.write_text(f"# never\n{url}\n")
    rows = [("listed", url), ("onion", "http://abcdefgh.onion.link/x.jpg"), ("bad", "ftp://example.org/x.jpg")]
    status = run(tmp_path, rows, exclude_urls=listed)
    assert [outcome(status, i) for i in range(3)] == ["excluded", "excluded", "bad_url"]
    assert server.hits["/excluded.jpg"] == 0


def test_stats_add_up_and_worker_processes_are_used(server, tmp_path):
    ok = server.add_bytes("/pool.jpg", image_bytes("JPEG", (500, 400)))
    rows = [(f"r{i}", ok if i % 3 else server.url(f"/missing-{i}")) for i in range(12)]
    status = run(tmp_path, rows, processes=1, shard_size=5, image=ImageSettings(resize=100, mode="center-crop"))
    out = tmp_path / "out"
    assert complete_shards(out) == [0, 1, 2]
    assert len(status) == 12
    total_ok = 0
    for shard in (0, 1, 2):
        stats = read_stats(out, shard)
        assert sum(stats["outcomes"].values()) == stats["rows"]
        assert stats["ok"] == len(list(iter_samples(out / f"{shard:05d}.tar")))
        total_ok += stats["ok"]
    overall = json.loads((out / "stats.json").read_text())
    assert overall["rows"] == 12 and overall["ok"] == total_ok == 8
    for s in iter_samples(out):
        assert Image.open(io.BytesIO(s.jpeg)).size == (100, 100)


def mpo_bytes() -> bytes:
    """A two-frame MPO (what many cameras write): a JPEG with a second image appended."""
    first, second = Image.new("RGB", (64, 48), (200, 0, 0)), Image.new("RGB", (64, 48), (0, 200, 0))
    out = io.BytesIO()
    first.save(out, "MPO", save_all=True, append_images=[second])
    return out.getvalue()


def test_unknown_bytes_and_mpo_get_gitcaps_own_outcomes(server, tmp_path):
    rows = [("gif-like", server.add_bytes("/gif-like", b"GIF89a" + b"x" * 40, "image/gif")),
            ("garbage", server.add_bytes("/garbage", b"\x00\x01garbage" * 20, "image/png")),
            ("mpo", server.add_bytes("/camera.mpo", mpo_bytes()))]
    status = run(tmp_path, rows, image=ImageSettings(resize=32))
    assert [outcome(status, i) for i in range(3)] == ["not_an_image", "not_an_image", "ok"]
    for i in range(2):
        error = status[f"{i:09d}"]["error"]
        assert error.startswith("not a JPEG, PNG") and "MPO" not in error and "Error" not in error


def test_a_decoder_failure_pillow_did_not_foresee_is_a_row_outcome(server, tmp_path, monkeypatch):
    from gitcli.formats import images

    def unsupported(im):
        raise KeyError("MPO")  # what Pillow raised for a type it could not open in full

    monkeypatch.setattr(images, "_to_rgb", unsupported)
    rows = [("png", server.add_bytes("/odd.png", image_bytes("PNG", (50, 40)), "image/png"))]
    status = run(tmp_path, rows)
    assert outcome(status, 0) == "unsupported_image"
    assert status["000000000"]["error"] == "a PNG RGB image that gitcap cannot decode"
    assert complete_shards(tmp_path / "out") == [0]
