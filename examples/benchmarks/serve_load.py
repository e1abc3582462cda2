"""Load benchmark of `gitcap serve`: concurrent clients against a real server process.

Starts `python -m gitcli serve` (a subprocess per configuration), drives it with an asyncio
client of its own (aiohttp's, which needs about a third of the CPU of httpx's per request: the
load generator shares the machine's cores with the server), and prints one table per scenario: requests/s,
generated tokens/s, p50/p95/p99 latency and time to first token (streamed chat
completions). Greedy decoding, up to 20 new tokens, on the demo checkpoint.

    python examples/benchmarks/serve_load.py                      # every scenario, 5-minute soak
    python examples/benchmarks/serve_load.py --quick              # a short smoke run of each
    python examples/benchmarks/serve_load.py --batching --lone    # only some scenarios

Scenarios (all by default):
  --batching  64 clients: requests/s against the same server with --max-batch-size 1 (target >= 8x),
              streamed chat completions and plain ones, in steady load (fixed windows,
              alternating between the two servers)
  --lone      one request at a time against the in-process decoding of the same image (target <= 1.3x)
  --mixed     32 clients, half max_tokens 4 and half 40: p95 latency of the short requests under
              --scheduler continuous against --scheduler whole (target <= 0.5x), measured as (a);
              lengths fixed with ignore_eos (as serving benchmarks do), and with natural ends beside
  --soak      N minutes at 64 clients mixing valid requests with every bad input and abrupt
              disconnects: 5xx other than deliberate 503s (must be 0), wrong answers (must be 0),
              server RSS at the end against after the first minute (target within 10%)

The checkpoint defaults to ./gitcap-demo; create it with `gitcap demo` (about 3 minutes
on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import json as json_module  # `post` takes a `json` argument, as HTTP clients do
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

console = Console(width=150)  # tables keep their columns when written to a file
MAX_NEW_TOKENS = 20
IMAGES = 16  # distinct scenes the clients cycle through (so batches mix different images)


# ----------------------------------------------------------------------------- inputs
@dataclass
class Scene:
    png: bytes
    question: str
    caption: str = ""  # what in-process decoding answers, the reference for every server reply
    answer: str = ""


def scenes(count: int) -> list[Scene]:
    from gitcli.data.synthetic import make_scene

    out = []
    for i in range(count):
        scene = make_scene(7, i)
        buf = io.BytesIO()
        scene.image.save(buf, format="PNG")
        out.append(Scene(buf.getvalue(), scene.qa[i % len(scene.qa)][0]))
    return out


def huge_png(width: int = 40000, height: int = 40000) -> bytes:
    """A few hundred bytes that claim a 1.6-gigapixel image (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def chat_body(png: bytes, question: str | None = None, max_tokens: int | None = None, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(png)}}]
    if question:
        content.append({"type": "text", "text": question})
    body = {"model": "gitcap", "messages": [{"role": "user", "content": content}], "temperature": 0}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    body.update(extra)
    return body


# ----------------------------------------------------------------------------- reference
class InProcess:
    """gitcap's own decoding in this process: what `gitcap caption` / `gitcap ask` do once the
    model is loaded (read the file, transform, decode one image)."""

    def __init__(self, checkpoint: Path):
        from gitcli.config import GenerationConfig
        from gitcli.infer import RuntimeOptions, load_model

        self.model, self.device, self.precision = load_model(checkpoint, None, RuntimeOptions(device="cpu"))
        self.gen = GenerationConfig(max_new_tokens=MAX_NEW_TOKENS)
        self.folder = tempfile.TemporaryDirectory()
        # The server decodes on a thread of its own, and torch's CPU kernels do not run alike
        # on the main thread and on another one (on a busy 2-core VM the main thread was
        # several times slower), so the reference is timed both ways.
        self.worker = ThreadPoolExecutor(max_workers=1)

    def decode_on_worker(self, png: bytes, question: str | None = None) -> str:
        return self.worker.submit(self.decode, png, question).result()

    def decode(self, png: bytes, question: str | None = None) -> str:
        from gitcli.infer import run_on_images

        path = Path(self.folder.name) / "image.png"
        path.write_bytes(png)
        result = run_on_images(self.model, self.precision, [path], [question], self.gen, 1)[0]
        return result.generation.text

    def fill_expected(self, items: list[Scene]) -> None:
        """Each scene's caption and answer: the reference for every server reply."""
        for item in items:
            item.caption = self.decode(item.png)
            item.answer = self.decode(item.png, item.question)


# ----------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def rss_bytes(self) -> int:
        """Resident memory of the server process, from /proc (Linux)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc")


@contextmanager
def serve(checkpoint: Path, *options: str):
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="gitcap-serve-", suffix=".log")[1])
    command = [sys.executable, "-m", "gitcli", "serve", "--checkpoint", str(checkpoint), "--port", str(port),
               "--max-new-tokens", str(MAX_NEW_TOKENS), "--device", "cpu", *SERVER_ARGS, *options]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited ({process.returncode}):\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=2) as response:
                    if json.loads(response.read()).get("status") == "ready":
                        break
            except (OSError, ValueError):  # not listening yet, or 503 while loading
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server was not ready within 180 s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the client
@dataclass
class Result:
    kind: str
    status: int
    latency: float
    ttft: float | None = None
    tokens: int = 0
    text: str | None = None
    expected: str | None = None
    error: str | None = None


def client(url: str, clients: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(base_url=url, connector=aiohttp.TCPConnector(limit=clients + 8),
                                 timeout=aiohttp.ClientTimeout(total=300))


async def stream_chat(http: aiohttp.ClientSession, body: dict, kind: str = "stream") -> Result:
    """One streamed chat completion: latency to `[DONE]`, time to the first content chunk."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, parts, usage = None, [], None
    async with http.post("/v1/chat/completions", json=body) as response:
        if response.status != 200:
            text = await response.text()
            return Result(kind, response.status, time.perf_counter() - start, error=text[:200])
        async for raw in response.content:  # one server-sent line at a time
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices", []):
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    parts.append(piece)
    tokens = usage["completion_tokens"] if usage else len(parts)
    return Result(kind, 200, time.perf_counter() - start, ttft, tokens, "".join(parts))


async def post(http: aiohttp.ClientSession, kind: str, path: str, *, files: dict | None = None,
               data: dict | None = None, json: dict | None = None, content: bytes | None = None,
               headers: dict | None = None) -> Result:
    """A POST as the tests' clients send it: multipart `files` (+ `data` fields), a `json`
    body, or raw `content` with `headers`."""
    if files is not None:
        form = aiohttp.FormData()
        for name, (filename, payload, content_type) in files.items():
            form.add_field(name, payload, filename=filename, content_type=content_type)
        for name, value in (data or {}).items():
            form.add_field(name, value)
        kwargs = {"data": form}
    elif json is not None:
        kwargs = {"json": json}
    else:
        kwargs = {"data": content, "headers": headers}
    start = time.perf_counter()
    async with http.post(path, **kwargs) as response:
        raw = await response.read()
        status = response.status
    latency = time.perf_counter() - start
    try:
        body = json_module.loads(raw)
    except ValueError:
        body = {}
    if status != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        return Result(kind, status, latency, error=message or raw[:200].decode("utf-8", "replace"))
    if "choices" in body:
        text = body["choices"][0]["message"]["content"]
    else:
        text = body.get("caption", body.get("answer"))
    return Result(kind, 200, latency, tokens=(body.get("usage") or {}).get("completion_tokens", 0), text=text)


SERVER_ARGS: list[str] = []  # --server-args: given to every server started (tuning runs)


async def closed_loop(url: str, clients: int, total: int, make_request) -> tuple[list[Result], float]:
    """`clients` concurrent clients, each sending its next request when the last one answered,
    until `total` requests have been sent. Returns the results and the wall time."""
    counter = iter(range(total))
    results: list[Result] = []
    async with client(url, clients) as http:
        async def one_client():
            for i in counter:
                results.append(await make_request(http, i))

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return results, time.perf_counter() - start


@dataclass
class Window:
    """One window of steady load on one server."""
    counted: list[Result]  # the requests that ended inside the window
    everything: list[Result]  # every request sent, those awaited after the window included
    client_cpu: float  # the load generator's share of one core


async def timed_loop(url: str, clients: int, settle: float, window: float, make_request) -> Window:
    """`clients` concurrent clients for `settle` + `window` seconds, each sending its next
    request when the last one answered. Counted are the requests that ended inside the
    window (the steady state); the ones still running at the end are awaited (each request
    is checked), not counted."""
    ended: list[tuple[float, Result]] = []
    async with client(url, clients) as http:
        start, cpu = time.perf_counter(), time.process_time()
        opens, closes = start + settle, start + settle + window

        async def one_client(k):
            i = k
            while time.perf_counter() < closes:
                result = await make_request(http, i)
                ended.append((time.perf_counter(), result))
                i += clients

        await asyncio.gather(*(one_client(k) for k in range(clients)))
        client_cpu = (time.process_time() - cpu) / (time.perf_counter() - start)
    return Window([r for end, r in ended if opens <= end < closes], [r for _, r in ended], client_cpu)


def alternate(checkpoint: Path, items: list[Scene], servers: dict[str, tuple[str, ...]], loads: dict,
              clients: int, rounds: int, settle: float, window: float) -> dict[tuple[str, str], list[Window]]:
    """The servers (name -> options) run side by side (an idle one waits on a condition
    variable), and each load (name -> request maker) alternates between them in rounds of
    steady windows, so that a change of the machine's speed (a shared VM's can move by 2x
    within an hour) does not land on one side of a comparison only.
    -> (server, load) -> its windows, one per round."""
    windows: dict[tuple[str, str], list[Window]] = {(name, load): [] for name in servers for load in loads}
    with ExitStack() as stack:
        urls = {name: stack.enter_context(serve(checkpoint, *options)).url for name, options in servers.items()}
        for url in urls.values():
            warm_up(url, items, 4)
        for _ in range(rounds):
            for load, request in loads.items():
                for name, url in urls.items():
                    windows[name, load].append(asyncio.run(timed_loop(url, clients, settle, window, request)))
    return windows


def warm_up(url: str, items: list[Scene], clients: int) -> None:
    """Run each batch size once before timing (first calls pay one-time costs)."""
    asyncio.run(closed_loop(url, clients, clients * 2,
                            lambda http, i: stream_chat(http, chat_body(items[i % len(items)].png))))


# ----------------------------------------------------------------------------- reporting
def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None or seconds != seconds else f"{seconds * 1000:.0f}"


def load_row(name: str, results: list[Result], seconds: float, rate: str, client_cpu: float) -> list[str]:
    ok = [r for r in results if r.status == 200]
    latencies = [r.latency for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    return [name, str(len(ok)), f"{len(results) - len(ok)}", rate, f"{sum(r.tokens for r in ok) / seconds:.0f}",
            ms(percentile(latencies, 50)), ms(percentile(latencies, 95)), ms(percentile(latencies, 99)),
            ms(percentile(ttfts, 50)), ms(percentile(ttfts, 95)), f"{client_cpu:.0%}"]


def load_table(title: str, rate: str = "req/s") -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("server", "ok", "failed", rate, "tokens/s", "p50 ms", "p95 ms", "p99 ms",
                   "TTFT p50 ms", "TTFT p95 ms", "client CPU"):
        table.add_column(column, justify="left" if column == "server" else "right")
    return table


def verdict(value: float, target: float, at_most: bool) -> str:
    met = value <= target if at_most else value >= target
    return "[green]met[/green]" if met else "[red]missed[/red]"


def check_texts(results: list[Result]) -> int:
    return sum(1 for r in results if r.status == 200 and r.expected is not None and r.text != r.expected)


# ----------------------------------------------------------------------------- scenarios
def scenario_batching(checkpoint: Path, items: list[Scene], quick: bool) -> None:
    """Both servers side by side, the load alternating between them (`alternate`): streamed
    chat completions, then plain ones (one JSON answer each: no per-token chunks to send).
    Each measurement is a window of steady load at 64 clients: what completes in the first
    seconds (64 requests arriving at once) and the requests still running when the window
    closes (a shrinking batch) are not counted, as load tools measure for a fixed duration.
    The ratio is of the medians."""
    clients, rounds = 64, (1 if quick else 3)
    settle, window = (1.0, 4.0) if quick else (2.0, 12.0)

    async def streamed(http, i):
        item = items[i % len(items)]
        result = await stream_chat(http, chat_body(item.png))
        result.expected = item.caption  # batched or not, the same text as in-process decoding
        return result

    async def plain(http, i):
        item = items[i % len(items)]
        result = await post(http, "chat", "/v1/chat/completions", json=chat_body(item.png))
        result.expected = item.caption
        return result

    servers = {"--max-batch-size 64": (), "--max-batch-size 1": ("--max-batch-size", "1")}
    modes = {"streamed": streamed, "not streamed": plain}
    windows = alternate(checkpoint, items, servers, modes, clients, rounds, settle, window)
    wrong = sum(check_texts(w.everything) for runs in windows.values() for w in runs)
    rates = {key: [sum(r.status == 200 for r in w.counted) / window for w in runs] for key, runs in windows.items()}

    table = load_table(f"(a) {clients} concurrent clients, steady load: {rounds} alternating "
                       f"{window:.0f}-second windows per row, greedy, <= {MAX_NEW_TOKENS} new tokens",
                       rate="req/s (median; range)")
    for name in servers:
        for mode in modes:
            runs, rate = windows[name, mode], rates[name, mode]
            rate_text = f"{statistics.median(rate):.1f}; {min(rate):.1f}-{max(rate):.1f}"
            table.add_row(*load_row(f"{name}, {mode}", [r for w in runs for r in w.counted], window * rounds,
                                    rate_text, statistics.median(w.client_cpu for w in runs)))
    console.print(table)
    fast_name, slow_name = servers
    for mode in modes:
        fast, slow = rates[fast_name, mode], rates[slow_name, mode]
        ratio = statistics.median(fast) / statistics.median(slow)
        per_round = [f / s for f, s in zip(fast, slow)]
        console.print(f"requests/s ratio, {mode}: [bold]{ratio:.1f}x[/bold] (target >= 8x: "
                      f"{verdict(ratio, 8, False)}; per round {', '.join(f'{r:.1f}x' for r in per_round)})")
    console.print(f"answers different from in-process decoding: {wrong}\n")


def scenario_lone(checkpoint: Path, items: list[Scene], local: InProcess, quick: bool) -> None:
    """One request at a time, alternating with the same decoding in this process, so that
    both see the same machine (other load on the cores shifts them together)."""
    repeats = 10 if quick else 40
    item = items[0]
    upload = {"image": ("scene.png", item.png, "image/png")}
    in_process, on_worker, served, streamed, wrong = [], [], [], [], 0
    with serve(checkpoint) as server:
        async def run():
            nonlocal wrong
            async with client(server.url, 1) as http:
                for i in range(3 + repeats):  # the first 3 rounds warm up
                    start = time.perf_counter()
                    text = local.decode(item.png)
                    took = time.perf_counter() - start
                    await asyncio.sleep(0.05)  # let this process' compute threads go idle
                    start = time.perf_counter()
                    text_on_worker = local.decode_on_worker(item.png)
                    took_on_worker = time.perf_counter() - start
                    await asyncio.sleep(0.05)
                    one = await post(http, "caption", "/v1/caption", files=upload)
                    two = await stream_chat(http, chat_body(item.png))
                    await asyncio.sleep(0.05)
                    if one.status != 200 or two.status != 200:
                        raise SystemExit(f"a lone request failed: {one.status} {one.error} / {two.status} {two.error}")
                    if i >= 3:
                        in_process.append(took)
                        on_worker.append(took_on_worker)
                        served.append(one)
                        streamed.append(two)
                        wrong += sum(t != item.caption for t in (one.text, two.text, text, text_on_worker))
        asyncio.run(run())
    table = Table(title=f"(b) one request at a time, the same image, greedy, <= {MAX_NEW_TOKENS} new tokens, "
                        f"{repeats} rounds", title_justify="left")
    for column in ("what", "p50 ms", "min ms", "TTFT p50 ms"):
        table.add_column(column, justify="left" if column == "what" else "right")
    table.add_row("in-process decoding, main thread (as gitcap caption runs)", ms(percentile(in_process, 50)),
                  ms(min(in_process)), "-")
    table.add_row("in-process decoding, a worker thread (as the server runs)", ms(percentile(on_worker, 50)),
                  ms(min(on_worker)), "-")
    table.add_row("POST /v1/caption (multipart)", ms(percentile([r.latency for r in served], 50)),
                  ms(min(r.latency for r in served)), "-")
    table.add_row("POST /v1/chat/completions, streamed", ms(percentile([r.latency for r in streamed], 50)),
                  ms(min(r.latency for r in streamed)), ms(percentile([r.ttft for r in streamed if r.ttft], 50)))
    console.print(table)
    # against the faster of the two in-process timings: the stricter comparison
    reference = min(percentile(in_process, 50), percentile(on_worker, 50))
    ratio = percentile([r.latency for r in served], 50) / reference
    console.print(f"lone request / fastest in-process decoding, p50: [bold]{ratio:.2f}x[/bold] (target <= 1.3x: "
                  f"{verdict(ratio, 1.3, True)}); answers different from in-process decoding: {wrong}\n")


def scenario_mixed(checkpoint: Path, items: list[Scene], quick: bool) -> None:
    """As (a): both schedulers side by side, the load alternating between them in rounds of
    steady windows (`alternate`); each scheduler's latencies are pooled over its rounds.

    Two loads. "fixed lengths" is the target's: every request sets `ignore_eos`, so the short
    ones generate exactly 4 tokens and the long ones 40, as serving benchmarks fix output
    lengths (vLLM's --ignore-eos, SGLang's default). "natural ends" sends the same requests
    without it: the demo model ends its captions at 6 to 20 tokens, so its "long" requests
    are not much longer than the short ones; it is shown beside, not judged."""
    clients, rounds = 32, (1 if quick else 3)
    settle, window = (1.0, 4.0) if quick else (2.0, 10.0)

    def load(fixed: bool):
        def request(http, i):
            item = items[i % len(items)]
            short = i % 2 == 0
            extra = {"ignore_eos": True} if fixed else {}
            return stream_chat(http, chat_body(item.png, max_tokens=4 if short else 40, **extra),
                               kind="short" if short else "long")
        return request

    loads = {"fixed lengths": load(True), "natural ends": load(False)}
    schedulers = {"continuous": ("--scheduler", "continuous"), "whole": ("--scheduler", "whole")}
    windows = alternate(checkpoint, items, schedulers, loads, clients, rounds, settle, window)
    table = Table(title=f"(c) {clients} clients, streamed captions, half max_tokens 4 and half 40: {rounds} "
                        f"alternating {window:.0f}-second windows per row", title_justify="left")
    for column in ("load", "scheduler", "ok", "req/s", "short p50 ms", "short p95 ms", "long p50 ms",
                   "long p95 ms", "TTFT p95 ms", "client CPU"):
        table.add_column(column, justify="left" if column in ("load", "scheduler") else "right")
    p95, per_round, verdicts = {}, {}, []  # per_round: the short requests' p95 of each window
    for load_name in loads:
        for name in schedulers:
            runs = windows[name, load_name]
            ok = [r for w in runs for r in w.counted if r.status == 200]
            short = [r.latency for r in ok if r.kind == "short"]
            long = [r.latency for r in ok if r.kind == "long"]
            p95[name] = percentile(short, 95)
            per_round[name] = [percentile([r.latency for r in w.counted if r.status == 200 and r.kind == "short"],
                                          95) for w in runs]
            table.add_row(load_name, name, str(len(ok)), f"{len(ok) / (window * rounds):.1f}",
                          ms(percentile(short, 50)), ms(p95[name]), ms(percentile(long, 50)),
                          ms(percentile(long, 95)), ms(percentile([r.ttft for r in ok if r.ttft], 95)),
                          f"{statistics.median(w.client_cpu for w in runs):.0%}")
            everything = [r for w in runs for r in w.everything]
            failed = sum(r.status != 200 for r in everything)
            if failed:
                console.print(f"[red]{failed} requests failed under --scheduler {name}, {load_name}[/red]")
            if load_name == "fixed lengths":  # each answer as long as asked: 4 or 40 tokens
                wrong = sum(r.tokens != (4 if r.kind == "short" else 40) for r in everything if r.status == 200)
                if wrong:
                    console.print(f"[red]{wrong} answers of another length than asked, --scheduler {name}[/red]")
        ratio = p95["continuous"] / p95["whole"]
        rounds_text = ", ".join(f"{c / w:.2f}x" for c, w in zip(per_round["continuous"], per_round["whole"]))
        judged = f"target <= 0.5x: {verdict(ratio, 0.5, True)}" if load_name == "fixed lengths" else "not judged"
        verdicts.append(f"short requests' p95, continuous / whole, {load_name}: [bold]{ratio:.2f}x[/bold] "
                        f"({judged}; per round {rounds_text})")
    console.print(table)
    for line in verdicts:
        console.print(line)
    console.print()


# Soak: what each client sends, by weight. Every bad input of the contract appears, with the
# status it must get; "disconnect" leaves in the middle of a streamed answer.
SOAK_MIX = {
    "caption": 16, "ask": 12, "chat": 8, "stream": 8, "disconnect": 4,
    "not an image": 2, "truncated image": 2, "over the pixel limit": 2, "oversize body": 1,
    "malformed JSON": 2, "malformed multipart": 2, "several images": 2, "n > 1": 2,
}
EXPECTED_STATUS = {
    "not an image": 400, "truncated image": 400, "over the pixel limit": 400, "oversize body": 413,
    "malformed JSON": 400, "malformed multipart": 400, "several images": 400, "n > 1": 400,
}
SOAK_MAX_IMAGE_BYTES = 1_000_000


async def soak_request(http: aiohttp.ClientSession, kind: str, item: Scene, bomb: bytes, oversize: bytes) -> Result:
    png = ("scene.png", item.png, "image/png")
    if kind == "caption":
        r = await post(http, kind, "/v1/caption", files={"image": png})
        r.expected = item.caption
    elif kind == "ask":
        r = await post(http, kind, "/v1/ask", files={"image": png}, data={"question": item.question})
        r.expected = item.answer
    elif kind == "chat":
        r = await post(http, kind, "/v1/chat/completions", json=chat_body(item.png, item.question))
        r.expected = item.answer
    elif kind == "stream":
        r = await stream_chat(http, chat_body(item.png))
        r.expected = item.caption
    elif kind == "disconnect":
        # Leave abruptly: at a random moment, before or during the streamed answer.
        start = time.perf_counter()
        try:
            await asyncio.wait_for(stream_chat(http, chat_body(item.png)), timeout=random.uniform(0.001, 0.3))
        except asyncio.TimeoutError:
            pass
        r = Result(kind, 0, time.perf_counter() - start)
    elif kind == "not an image":
        r = await post(http, kind, "/v1/caption", files={"image": ("notes.png", b"just some text\n" * 40, "image/png")})
    elif kind == "truncated image":
        r = await post(http, kind, "/v1/caption", files={"image": ("cut.png", item.png[: len(item.png) // 2], "image/png")})
    elif kind == "over the pixel limit":
        r = await post(http, kind, "/v1/caption", files={"image": ("bomb.png", bomb, "image/png")})
    elif kind == "oversize body":
        r = await post(http, kind, "/v1/caption", files={"image": ("big.png", oversize, "image/png")})
    elif kind == "malformed JSON":
        r = await post(http, kind, "/v1/chat/completions", content=b'{"messages": [', headers={"content-type": "application/json"})
    elif kind == "malformed multipart":
        r = await post(http, kind, "/v1/caption", content=b"--nope\r\ngarbage without headers",
                       headers={"content-type": "multipart/form-data; boundary=xyz"})
    elif kind == "several images":
        body = chat_body(item.png)
        body["messages"][0]["content"].append({"type": "image_url", "image_url": {"url": data_url(item.png)}})
        r = await post(http, kind, "/v1/chat/completions", json=body)
    elif kind == "n > 1":
        r = await post(http, kind, "/v1/chat/completions", json=chat_body(item.png, n=2))
    else:
        raise ValueError(kind)
    return r


def scenario_soak(checkpoint: Path, items: list[Scene], minutes: float, quick: bool) -> None:
    clients = 64
    duration = 30.0 if quick else minutes * 60
    first_sample = duration / 4 if quick else 60.0
    kinds, weights = zip(*SOAK_MIX.items())
    bomb = huge_png()
    oversize = items[0].png + os.urandom(SOAK_MAX_IMAGE_BYTES)  # a valid PNG with junk after it, over the limit
    rng = random.Random(0)
    results: list[Result] = []
    with serve(checkpoint, "--max-image-bytes", str(SOAK_MAX_IMAGE_BYTES)) as server:
        rss: dict[str, int] = {}

        async def run():
            async with client(server.url, clients) as http:
                deadline = time.monotonic() + duration

                async def one_client():
                    while time.monotonic() < deadline:
                        kind = rng.choices(kinds, weights)[0]
                        item = items[rng.randrange(len(items))]
                        try:
                            results.append(await soak_request(http, kind, item, bomb, oversize))
                        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # the server closed on us: counted, never expected
                            results.append(Result(kind, -1, 0.0, error=f"{type(exc).__name__}: {exc}"))

                async def sample():
                    await asyncio.sleep(first_sample)
                    rss["first"] = server.rss_bytes()

                await asyncio.gather(sample(), *(one_client() for _ in range(clients)))
            await asyncio.sleep(1.0)  # let the server finish what the disconnects left behind
            rss["end"] = server.rss_bytes()

        start = time.perf_counter()
        asyncio.run(run())
        wall = time.perf_counter() - start

    table = Table(title=f"(d) soak: {wall / 60:.1f} min at {clients} clients, valid and bad requests mixed, "
                        f"abrupt disconnects", title_justify="left")
    for column in ("request", "sent", "answered as expected", "503", "5xx (not 503)", "other", "wrong text", "p95 ms"):
        table.add_column(column, justify="left" if column == "request" else "right")
    total_5xx = total_wrong = total_other = 0
    for kind in kinds:
        mine = [r for r in results if r.kind == kind]
        if kind == "disconnect":
            table.add_row(kind, str(len(mine)), "-", "-", "-", "-", "-", "-")
            continue
        want = EXPECTED_STATUS.get(kind, 200)
        good = [r for r in mine if r.status == want]
        n503 = sum(r.status == 503 for r in mine)
        n5xx = sum(r.status >= 500 and r.status != 503 for r in mine)
        other = len(mine) - len(good) - n503 - n5xx
        wrong = check_texts(mine)
        total_5xx += n5xx
        total_wrong += wrong
        total_other += other
        table.add_row(kind, str(len(mine)), str(len(good) - wrong), str(n503), str(n5xx), str(other), str(wrong),
                      ms(percentile([r.latency for r in good], 95)))
    console.print(table)
    for r in [r for r in results if r.kind != "disconnect" and r.status not in (EXPECTED_STATUS.get(r.kind, 200), 503)][:5]:
        console.print(f"  e.g. {r.kind}: {r.status} {r.error}")
    growth = rss["end"] / rss["first"] - 1
    console.print(f"5xx other than 503: [bold]{total_5xx}[/bold] (must be 0: {verdict(total_5xx, 0, True)}); "
                  f"wrong answers: [bold]{total_wrong}[/bold] (must be 0: {verdict(total_wrong, 0, True)}); "
                  f"unexpected statuses: {total_other}")
    console.print(f"server RSS after {first_sample:.0f} s: {rss['first'] / 2**20:.0f} MiB, at the end: "
                  f"{rss['end'] / 2**20:.0f} MiB ({growth:+.1%}; target within 10%: {verdict(abs(growth), 0.10, True)})\n")


# ----------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=Path("gitcap-demo"),
                        help="a gitcap checkpoint (default ./gitcap-demo; create it with `gitcap demo`)")
    parser.add_argument("--batching", action="store_true", help="(a) 64 clients vs --max-batch-size 1")
    parser.add_argument("--lone", action="store_true", help="(b) a lone request vs in-process decoding")
    parser.add_argument("--mixed", action="store_true", help="(c) mixed lengths: continuous vs whole batches")
    parser.add_argument("--soak", action="store_true", help="(d) the soak with bad inputs and disconnects")
    parser.add_argument("--soak-minutes", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="a short smoke run of each scenario")
    parser.add_argument("--server-args", default="", help="options for every server started, e.g. "
                                                          "'--prefill-batch 8' (each scenario's own come after)")
    args = parser.parse_args()
    SERVER_ARGS.extend(args.server_args.split())
    if not any((args.checkpoint / name).exists() for name in ("gitcap.json", "latest")):  # a checkpoint or a run
        raise SystemExit(f"no checkpoint at {args.checkpoint}: create the demo one with `gitcap demo` "
                         f"(about 3 minutes on a 2-core CPU), or pass --checkpoint DIR")
    chosen = [name for name in ("batching", "lone", "mixed", "soak") if getattr(args, name)]
    chosen = chosen or ["batching", "lone", "mixed", "soak"]

    items = scenes(IMAGES)
    console.print(f"checkpoint {args.checkpoint}, greedy, <= {MAX_NEW_TOKENS} new tokens, "
                  f"{os.cpu_count()} CPUs; in-process reference decoding…")
    local = InProcess(args.checkpoint)
    local.fill_expected(items)
    if "batching" in chosen:
        scenario_batching(args.checkpoint, items, args.quick)
    if "lone" in chosen:
        scenario_lone(args.checkpoint, items, local, args.quick)
    if "mixed" in chosen:
        scenario_mixed(args.checkpoint, items, args.quick)
    if "soak" in chosen:
        scenario_soak(args.checkpoint, items, args.soak_minutes, args.quick)


if __name__ == "__main__":
    main()
