"""A fix and a rerun must work: rows an option refused are fetched again once the options
allow them, final outcomes are not, and a run where nothing succeeded says why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.fetch import check_dataset, image_bytes, status_by_key, write_tsv
from support.fetch import server  # noqa: F401  (a fixture)

from gitcli.fetch import FetchConfig, fetch
from gitcli.fetch.report import nothing_fetched
from gitcli.formats.images import ImageSettings
from gitcli.formats.shards import complete_shards, read_stats

REPO = Path(__file__).resolve().parents[1]


def run(tmp_path: Path, tsv: Path, **options):
    opts = dict(processes=0, retries=0, timeout=5.0, progress=False, shard_size=4)
    opts.update(options)
    return fetch(FetchConfig(tsv=tsv, out=tmp_path / "out", **opts))


def outcomes(out: Path, n: int) -> list[str]:
    status = status_by_key(out)
    return [status[f"{i:09d}"]["outcome"] for i in range(n)]


def test_rows_an_option_refused_are_fetched_again_once_allowed(server, tmp_path):
    small, big, many_pixels = image_bytes(), image_bytes("PNG", (900, 900)), image_bytes("PNG", (300, 300))
    limit = max(len(small), len(many_pixels)) + 1
    assert len(big) > limit
    urls = {
        "ok": server.add_bytes("/ok.jpg", small),
        "big": server.add_bytes("/big.png", big, "image/png"),
        "pixels": server.add_bytes("/pixels.png", many_pixels, "image/png"),
        "gone": server.url("/gone.jpg"),
        "page": server.add_bytes("/page.jpg", b"<html>no</html>", "text/html"),
        "noai": server.add_bytes("/noai.jpg", small, headers={"X-Robots-Tag": "noai"}),
    }
    tsv = write_tsv(tmp_path / "rows.tsv", [(n, u) for n, u in urls.items()])
    out = tmp_path / "out"

    # 1. a mirror on a private address, no allowance: every row blocked, nothing requested
    summary = run(tmp_path, tsv)
    assert outcomes(out, 6) == ["blocked_address"] * 6 and sum(server.hits.values()) == 0
    assert complete_shards(out) == [0, 1]
    problem = nothing_fetched(summary.outcomes, FetchConfig(tsv=tsv, out=out))
    assert problem.startswith("all 6 rows blocked_address") and "--allow-private-addresses" in problem

    # 2. the fix: allowed now, with tight limits: every row is asked for again
    tight = dict(allow_addresses=("127.0.0.1",), max_bytes=limit, image=ImageSettings(max_pixels=80_000))
    summary = run(tmp_path, tsv, **tight)
    assert summary.rows == 6
    assert outcomes(out, 6) == ["ok", "too_large", "too_many_pixels", "http_404", "not_an_image", "opted_out"]
    assert nothing_fetched(summary.outcomes, FetchConfig(tsv=tsv, out=out)) is None

    # 3. the same options again: nothing to do, nothing requested
    hits = dict(server.hits)
    assert run(tmp_path, tsv, **tight).rows == 0
    assert dict(server.hits) == hits

    # 4. looser limits: only the rows they refused are asked for; 404 and the page are final
    summary = run(tmp_path, tsv, allow_addresses=("127.0.0.1",), disallowed_robots=())
    assert summary.rows == 3
    assert outcomes(out, 6) == ["ok", "ok", "ok", "http_404", "not_an_image", "ok"]
    for path in ("/ok.jpg", "/gone.jpg", "/page.jpg"):
        assert server.hits[path] == hits[path], path
    assert complete_shards(out) == [0, 1]
    check_dataset(out, 6)
    assert read_stats(out, 0)["ok"] == 3 and read_stats(out, 1)["ok"] == 1
    assert read_stats(out, 1)["limits"]["disallowed_robots"] == []


def test_narrower_options_do_not_refetch(server, tmp_path):
    url = server.add_bytes("/big.png", image_bytes("PNG", (400, 400)), "image/png")
    tsv = write_tsv(tmp_path / "rows.tsv", [("big", url)])
    run(tmp_path, tsv, allow_addresses=("127.0.0.1",), max_bytes=1000)
    assert server.hits["/big.png"] == 1
    run(tmp_path, tsv, allow_addresses=("127.0.0.1",), max_bytes=500)  # still refuses it: not asked
    assert server.hits["/big.png"] == 1


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gitcli", "fetch", *args, "--processes", "0", "--retries", "0",
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_cli_run_with_no_success_exits_nonzero_and_names_the_fix(server, tmp_path):
    url = server.add_bytes("/lan.jpg", image_bytes())
    tsv = write_tsv(tmp_path / "rows.tsv", [("lan", url)] * 3)
    out = tmp_path / "out"
    first = cli(str(tsv), "--out", str(out))
    assert first.returncode == 1, first.stderr
    assert "Traceback" not in first.stderr
    last = first.stderr.strip().splitlines()[-1]
    assert "all 3 rows blocked_address" in last and "--allow-address" in last
    # the outcome table and the dataset line are the result (stdout); the error is not
    assert "blocked_address" in first.stdout and "dataset" in first.stdout and "error" not in first.stdout
    assert "this run" not in first.stderr
    fixed = cli(str(tsv), "--out", str(out), "--allow-address", "127.0.0.1")
    assert fixed.returncode == 0, fixed.stderr
    assert outcomes(out, 3) == ["ok"] * 3 and server.hits["/lan.jpg"] == 3


def test_nothing_fetched_names_the_top_cause():
    cfg = FetchConfig(tsv=Path("x"), out=Path("y"), max_bytes=1000)
    assert nothing_fetched({}, cfg) is None
    assert nothing_fetched({"ok": 1, "http_404": 9}, cfg) is None
    message = nothing_fetched({"http_404": 2, "too_large": 5}, cfg)
    assert message.startswith("no row of 7 succeeded; 5 rows too_large") and "--max-bytes 1,000" in message
    assert "--retry-failed" in nothing_fetched({"timeout": 4}, cfg)


def test_a_complete_shard_fetched_from_other_rows_is_fetched_again(server, tmp_path):
    from gitcli.formats.cc import TsvLayout
    from gitcli.formats.shards import iter_samples

    urls = [server.add_bytes(f"/c{i}.jpg", image_bytes()) for i in range(3)]
    tsv = tmp_path / "rows.tsv"
    # url first: not CC's order (captions that look like URLs get past the input check,
    # which refuses a file with no URL at all where the URLs should be)
    tsv.write_text("".join(f"{u}\tcaption://{i}\n" for i, u in enumerate(urls)))
    out = tmp_path / "out"
    allowed = dict(allow_addresses=("127.0.0.1",))
    summary = run(tmp_path, tsv, **allowed)
    assert outcomes(out, 3) == ["bad_url"] * 3
    assert "--url-column" in nothing_fetched(summary.outcomes, FetchConfig(tsv=tsv, out=out))

    # the fix the message names: the right columns; the complete shard is not trusted
    fixed = TsvLayout(url_column="0", caption_column="1")
    assert run(tmp_path, tsv, layout=fixed, **allowed).rows == 3
    assert outcomes(out, 3) == ["ok"] * 3
    assert sorted((s.key, s.caption) for s in iter_samples(out)) == [(f"{i:09d}", f"caption://{i}") for i in range(3)]
    assert run(tmp_path, tsv, layout=fixed, **allowed).rows == 0  # and now it is
    check_dataset(out, 3)

    # a TSV that grew (a first try on its head): the last shard is completed, not trusted
    tsv.write_text(tsv.read_text() + f"{server.add_bytes('/c3.jpg', image_bytes())}\tcaption://3\n")
    assert run(tmp_path, tsv, layout=fixed, **allowed).rows == 4
    assert outcomes(out, 4) == ["ok"] * 4
    check_dataset(out, 4)


def test_a_longer_timeout_asks_again_for_the_rows_that_timed_out(server, tmp_path):
    import asyncio

    from aiohttp import web

    body = image_bytes()

    async def slow(request, n):
        await asyncio.sleep(0.6)
        return web.Response(body=body, content_type="image/jpeg")

    tsv = write_tsv(tmp_path / "rows.tsv", [("slow", server.add("/slow.jpg", slow)),
                                            ("fast", server.add_bytes("/fast.jpg", body))])
    allowed = dict(allow_addresses=("127.0.0.1",))
    run(tmp_path, tsv, timeout=0.2, **allowed)
    assert outcomes(tmp_path / "out", 2) == ["timeout", "ok"]
    assert run(tmp_path, tsv, timeout=0.2, **allowed).rows == 0  # same timeout: final for this setting
    assert run(tmp_path, tsv, timeout=5.0, **allowed).rows == 1
    assert outcomes(tmp_path / "out", 2) == ["ok", "ok"] and server.hits["/fast.jpg"] == 1
