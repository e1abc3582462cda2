"""Resume after SIGKILL, --retry-failed, --part, --format files, and the command line."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiohttp import web
from support.fetch import check_dataset, image_bytes, status_by_key, write_tsv
from support.fetch import server  # noqa: F401  (a fixture)

from gitcli.fetch import FetchConfig, fetch
from gitcli.formats.images import ImageSettings
from gitcli.formats.shards import complete_shards, iter_samples, read_stats

REPO = Path(__file__).resolve().parents[1]


def config(tmp_path: Path, tsv: Path, **options) -> FetchConfig:
    opts = dict(allow_addresses=("127.0.0.1",), processes=0, retries=0, retry_backoff=0.01,
                timeout=5.0, progress=False, shard_size=4)
    opts.update(options)
    return FetchConfig(tsv=tsv, out=tmp_path / "out", **opts)


def test_sigkill_mid_run_then_rerun_accounts_for_every_row_once(server, tmp_path):
    jpg = image_bytes()
    gate = threading.Event()  # rows >= 8 hang until the second run

    async def image(request, n):
        if int(request.match_info.get("tail", "0").split("/")[-1].split(".")[0]) >= 8:
            import asyncio
            while not gate.is_set():
                await asyncio.sleep(0.02)
        return web.Response(body=jpg, content_type="image/jpeg")

    rows = []
    for i in range(14):
        path = f"/img/{i}.jpg"
        server.add(path, image)
        rows.append((f"row {i}", server.url(path) if i != 5 else server.url("/missing.jpg")))
    tsv = write_tsv(tmp_path / "rows.tsv", rows)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gitcli", "fetch", str(tsv), "--out", str(out), "--shard-size", "4",
           "--allow-address", "127.0.0.1", "--processes", "2", "--concurrency", "4", "--retries", "0",
           "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while complete_shards(out) != [0, 1] and time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.05)
    assert complete_shards(out) == [0, 1]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "00002_stats.json").exists()  # shards 2 and 3 were cut short
    first_hits = {i: server.hits[f"/img/{i}.jpg"] for i in range(8)}
    assert all(n == 1 for i, n in first_hits.items() if i != 5)

    gate.set()
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert rerun.returncode == 0, rerun.stderr
    assert complete_shards(out) == [0, 1, 2, 3]
    # complete shards were not fetched again
    assert {i: server.hits[f"/img/{i}.jpg"] for i in range(8)} == first_hits
    check_dataset(out, 14)
    status = status_by_key(out)
    assert status["000000005"]["outcome"] == "http_404"
    assert sum(1 for s in iter_samples(out)) == 13


def test_rerun_of_a_finished_dataset_requests_nothing(server, tmp_path):
    url = server.add_bytes("/a.jpg", image_bytes())
    tsv = write_tsv(tmp_path / "rows.tsv", [("a", url)] * 6)
    fetch(config(tmp_path, tsv))
    assert server.hits["/a.jpg"] == 6
    summary = fetch(config(tmp_path, tsv))
    assert server.hits["/a.jpg"] == 6 and summary.rows == 0
    check_dataset(tmp_path / "out", 6)


def test_retry_failed_refetches_only_transient_failures(server, tmp_path):
    jpg = image_bytes()
    healthy = threading.Event()

    async def sometimes(request, n):
        if not healthy.is_set():
            return web.Response(status=503)
        return web.Response(body=jpg, content_type="image/jpeg")

    rows = [("ok", server.add_bytes("/ok.jpg", jpg)), ("flaky", server.add("/flaky.jpg", sometimes)),
            ("gone", server.url("/gone.jpg")), ("ok2", server.add_bytes("/ok2.jpg", jpg)),
            ("flaky2", server.add("/flaky2.jpg", sometimes))]
    tsv = write_tsv(tmp_path / "rows.tsv", rows)
    fetch(config(tmp_path, tsv))
    out = tmp_path / "out"
    before = status_by_key(out)
    assert [before[f"{i:09d}"]["outcome"] for i in range(5)] == ["ok", "http_503", "http_404", "ok", "http_503"]

    healthy.set()
    hits = dict(server.hits)
    summary = fetch(config(tmp_path, tsv, retry_failed=True))
    assert summary.rows == 2  # only the two 503 rows
    assert server.hits["/gone.jpg"] == hits["/gone.jpg"] and server.hits["/ok.jpg"] == hits["/ok.jpg"]
    after = status_by_key(out)
    assert [after[f"{i:09d}"]["outcome"] for i in range(5)] == ["ok", "ok", "http_404", "ok", "ok"]
    assert sorted(s.key for s in iter_samples(out)) == ["000000000", "000000001", "000000003", "000000004"]
    check_dataset(out, 5)
    assert read_stats(out, 0)["ok"] == 3 and read_stats(out, 0)["retried_rows"] == 1


def test_parts_split_whole_shards_without_overlap(server, tmp_path):
    url = server.add_bytes("/p.jpg", image_bytes())
    tsv = write_tsv(tmp_path / "rows.tsv", [("p", url)] * 18)  # shards 0..4 of size 4
    seen = []
    for i in (1, 2, 3):
        fetch(config(tmp_path, tsv, part=(i, 3)))
        now = complete_shards(tmp_path / "out")
        seen.append(sorted(set(now) - {s for part in seen for s in part}))
    assert seen == [[0, 3], [1, 4], [2]]
    assert server.hits["/p.jpg"] == 18
    check_dataset(tmp_path / "out", 18)


def test_files_format_writes_numbered_jpegs_with_status_and_stats(server, tmp_path):
    url = server.add_bytes("/f.jpg", image_bytes("PNG", (300, 200)), "image/png")
    tsv = write_tsv(tmp_path / "rows.tsv", [("f", url), ("missing", server.url("/nope")), ("f", url)])
    fetch(config(tmp_path, tsv, output_format="files", shard_size=2, image=ImageSettings(resize=50)))
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.jpg")) == ["00000000.jpg", "00000002.jpg"]
    assert not list(out.glob("*.tar"))
    assert complete_shards(out) == [0, 1]
    assert read_stats(out, 0)["ok"] == 1 and read_stats(out, 1)["ok"] == 1
    assert len(status_by_key(out)) == 3


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gitcli", "fetch", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("args, message", [
    (["does-not-exist.tsv", "--out", "o"], "TSV not found"),
    (["{tsv}", "--out", "o", "--part", "3/2"], "--part"),
    (["{tsv}", "--out", "o", "--part", "x"], "I/N"),
    (["{tsv}", "--out", "o", "--allow-address", "not-an-ip"], "not an IP address"),
    (["{tsv}", "--out", "o", "--format", "zip"], "--format"),
    (["{tsv}", "--out", "o", "--url-column", "url"], "--header"),
    (["{tsv}", "--out", "o", "--header", "--url-column", "link"], "not in the header"),
    (["{folder}", "--out", "o"], "got a folder"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, args, message):
    tsv = write_tsv(tmp_path / "rows.tsv", [("a", "http://example.invalid/a.jpg")])
    names = {"{tsv}": str(tsv), "{folder}": str(tmp_path), "o": str(tmp_path / "o")}
    result = cli(*[names.get(a, a) for a in args])
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing is created before the input is known good


def test_help_has_an_example():
    result = cli("--help")
    assert result.returncode == 0 and "Example" in result.stdout and "--out" in result.stdout


def test_fetch_is_a_torch_free_leaf():
    code = ("import sys, gitcli.fetch, gitcli.cli.fetch; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') or "
            "(m.startswith('gitcli.') and not m.startswith(('gitcli.fetch', 'gitcli.formats', 'gitcli.config', "
            "'gitcli.errors', 'gitcli.progress', 'gitcli.cli')))]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow  # four processes: about 12 s on 2 cores
def test_a_second_run_of_the_same_part_is_refused_other_parts_run(server, tmp_path):
    jpg = image_bytes()
    gate = threading.Event()  # shard 0's rows hang until the refused runs are done

    async def held(request, n):
        import asyncio
        while not gate.is_set():
            await asyncio.sleep(0.02)
        return web.Response(body=jpg, content_type="image/jpeg")

    rows = [("held", server.add("/held.jpg", held))] * 2 + [("free", server.add_bytes("/free.jpg", jpg))] * 2
    tsv = write_tsv(tmp_path / "rows.tsv", rows)
    out = tmp_path / "out"
    base = [sys.executable, "-m", "gitcli", "fetch", str(tsv), "--out", str(out), "--shard-size", "2",
            "--allow-address", "127.0.0.1", "--processes", "0", "--retries", "0", "--no-progress"]
    first = subprocess.Popen(base + ["--part", "1/2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while server.hits["/held.jpg"] == 0 and time.monotonic() < deadline:
            assert first.poll() is None, first.stderr.read()
            time.sleep(0.05)
        assert server.hits["/held.jpg"] > 0  # the first run is mid-shard, holding its lock

        second = subprocess.run(base + ["--part", "1/2"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        assert "Traceback" not in second.stderr and len(second.stderr.strip().splitlines()) == 1
        assert f"pid {first.pid}" in second.stderr and "--part 1/2" in second.stderr

        other = subprocess.run(base + ["--part", "2/2"], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert other.returncode == 0, other.stderr  # the other part shares the folder by design
        assert complete_shards(out) == [1]
    finally:
        gate.set()
        assert first.wait(60) == 0, first.stderr.read()
    assert complete_shards(out) == [0, 1]
    check_dataset(out, 4, shard_size=2)
    assert not list(out.glob(".*.lock"))  # released and removed
