"""One shard's rows: decoding happens off the event loop, so a slow image holds up
neither the downloads nor the other images of its worker."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from aiohttp import web
from support.fetch import LoopbackServer, image_bytes

from gitcli.fetch import shard_fetch
from gitcli.fetch.config import FetchConfig
from gitcli.fetch.plan import ShardPlan
from gitcli.formats.cc import Row
from gitcli.formats.shards import iter_samples

SLOW_DECODE_S = 1.5


def test_a_slow_decode_does_not_stall_the_other_rows(tmp_path, monkeypatch):
    server = LoopbackServer("127.0.0.1")
    try:
        jpg = image_bytes()

        async def delayed(request, n):
            await asyncio.sleep(0.3)  # these bodies arrive while the slow image is decoding
            return web.Response(body=jpg, content_type="image/jpeg")

        slow_url = server.add_bytes("/slow.jpg", image_bytes("PNG", (64, 64)), "image/png")
        rows = [Row(0, "slow", slow_url)] + [Row(i, f"fast {i}", server.add(f"/fast-{i}.jpg", delayed))
                                             for i in range(1, 7)]
        real = shard_fetch.normalize_image
        slow_decode: dict[str, float] = {}

        def normalize(body, settings):
            if body.startswith(b"\x89PNG"):
                slow_decode["start"] = time.monotonic()
                time.sleep(SLOW_DECODE_S)  # blocks whichever thread runs it
                slow_decode["end"] = time.monotonic()
            return real(body, settings)

        monkeypatch.setattr(shard_fetch, "normalize_image", normalize)
        done: dict[str, float] = {}
        lock = threading.Lock()

        def on_row(outcome: str, nbytes: int) -> None:
            with lock:
                done[f"{len(done)}:{outcome}"] = time.monotonic()

        out = tmp_path / "out"
        out.mkdir()
        cfg = FetchConfig(tsv=tmp_path / "unused.tsv", out=out, allow_addresses=("127.0.0.1",), processes=0,
                          retries=0, timeout=5.0, progress=False, shard_size=100)
        stats = asyncio.run(shard_fetch.fetch_shard(cfg, ShardPlan(0), rows, on_row))
    finally:
        server.close()
    assert stats["ok"] == 7
    finished = sorted(done.values())
    # six fast rows downloaded and decoded while the slow one was still decoding
    assert len(finished) == 7 and finished[5] < slow_decode["end"], (slow_decode, finished)
    assert finished[-1] >= slow_decode["end"]
    assert sorted(s.key for s in iter_samples(out / "00000.tar")) == [f"{i:09d}" for i in range(7)]


def test_decode_threads_follow_the_workers_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(shard_fetch, "default_processes", lambda: 8)

    def threads(processes: int) -> int:
        return shard_fetch.decode_threads(FetchConfig(tsv=Path("x.tsv"), out=Path("x"), processes=processes))

    assert [threads(0), threads(2), threads(3), threads(8)] == [8, 4, 3, 2]  # never below 2


def test_a_shard_is_durable_in_order_tar_then_status_then_stats(tmp_path, monkeypatch):
    """After a power loss, a stats file (the shard is complete) implies its tar and status
    are on disk: each file is fsynced before its rename, each rename is made durable (a
    directory fsync) before the next file appears, and the stats file comes last."""
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", os.path.basename(dst)))
        return real_replace(src, dst)

    server = LoopbackServer("127.0.0.1")
    try:
        rows = [Row(i, f"r{i}", server.add_bytes(f"/{i}.jpg", image_bytes())) for i in range(2)]
        out = tmp_path / "out"
        out.mkdir()
        cfg = FetchConfig(tsv=tmp_path / "unused.tsv", out=out, allow_addresses=("127.0.0.1",), processes=0,
                          retries=0, timeout=5.0, progress=False, shard_size=100)
        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)
        asyncio.run(shard_fetch.fetch_shard(cfg, ShardPlan(0), rows, lambda outcome, nbytes: None))
    finally:
        monkeypatch.undo()
        server.close()
    renames = [name for kind, name in events if kind == "rename"]
    assert renames == ["00000.tar", "00000_status.jsonl", "00000_stats.json"]
    for name in renames:
        at = events.index(("rename", name))
        assert events[at - 1][0] == "fsync" and events[at - 1][1].startswith(f".{name}.tmp-")  # content first
        assert events[at + 1] == ("fsync", "out")  # the rename itself, before anything else appears
