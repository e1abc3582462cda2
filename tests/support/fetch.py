"""Helpers for the fetch tests: a local aiohttp server on loopback (127.0.0.1 or
127.0.0.2 only) running in a background thread, in-memory test images, and a check that
a fetched dataset accounts for every row once.
"""

from __future__ import annotations

import asyncio
import io
import json
import struct
import tarfile
import threading
import time
import zlib

import pytest
from collections import Counter
from pathlib import Path
from typing import Awaitable, Callable

from aiohttp import web
from PIL import Image

from gitcli.formats.shards import complete_shards, read_stats

Handler = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


class LoopbackServer:
    """Routes are `path -> async handler(request, hit_number)`; every request is logged."""

    def __init__(self, host: str = "127.0.0.1"):
        assert host in ("127.0.0.1", "127.0.0.2")
        self.host = host
        self.routes: dict[str, Handler] = {}
        self.hits: Counter[str] = Counter()
        self.log: list[tuple[str, float, dict]] = []  # (path, monotonic time, headers)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, self.host, 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        with self._lock:
            self.hits[path] += 1
            n = self.hits[path]
            self.log.append((path, time.monotonic(), dict(request.headers)))
        handler = self.routes.get(path)
        if handler is None:
            return web.Response(status=404, text="no such route")
        return await handler(request, n)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"

    def add(self, path: str, handler: Handler) -> str:
        self.routes[path] = handler
        return self.url(path)

    def add_bytes(self, path: str, body: bytes, content_type: str = "image/jpeg", headers: dict | None = None) -> str:
        async def handler(request, n):
            return web.Response(body=body, content_type=content_type, headers=headers)
        return self.add(path, handler)

    def close(self) -> None:
        async def stop():
            await self._runner.cleanup()
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def image_bytes(fmt: str = "JPEG", size: tuple[int, int] = (320, 200), color=(200, 30, 30), mode: str = "RGB") -> bytes:
    im = Image.new(mode, size, color if mode == "RGB" else color + (255,))
    # some texture, so JPEG decoding does real work and truncation is detectable
    for x in range(0, size[0], 7):
        for y in range(0, size[1], 5):
            im.putpixel((x, y), (x % 256, y % 256, 90) if mode == "RGB" else (x % 256, y % 256, 90, 255))
    out = io.BytesIO()
    im.save(out, fmt)
    return out.getvalue()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header claims huge dimensions (a decompression bomb's calling card)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_tsv(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f"{c}\t{u}\n" for c, u in rows), encoding="utf-8")
    return path


def status_by_key(out: Path) -> dict[str, dict]:
    """Every status line of every shard in `out`, by key; fails on a duplicate key."""
    lines: dict[str, dict] = {}
    for p in sorted(out.glob("*_status.jsonl")):
        for line in p.read_text().splitlines():
            d = json.loads(line)
            assert d["key"] not in lines, f"row {d['key']} recorded twice"
            lines[d["key"]] = d
    return lines


def check_dataset(out: Path, n_rows: int, shard_size: int = 4) -> None:
    """Every row recorded exactly once, every tar valid, stats add up."""
    status = status_by_key(out)  # asserts no key twice
    assert sorted(status) == [f"{i:09d}" for i in range(n_rows)]
    overall_ok = 0
    for shard in complete_shards(out):
        stats = read_stats(out, shard)
        with tarfile.open(out / f"{shard:05d}.tar") as tar:
            names = tar.getnames()
        keys = sorted({n.split(".")[0] for n in names})
        assert len(names) == 3 * len(keys)  # jpg, txt, json for each key
        ok_keys = sorted(k for k, s in status.items() if s["outcome"] == "ok" and int(k) // shard_size == shard)
        assert keys == ok_keys
        assert stats["ok"] == len(keys)
        assert sum(stats["outcomes"].values()) == stats["rows"]
        overall_ok += stats["ok"]
    assert not list(out.glob(".*.tmp-*"))
    overall = json.loads((out / "stats.json").read_text())
    assert overall["rows"] == n_rows and overall["ok"] == overall_ok


@pytest.fixture
def server():
    """A loopback image server for one test (the fetch tests' `server` fixture)."""
    s = LoopbackServer("127.0.0.1")
    yield s
    s.close()
