"""The bridge between asyncio requests and the decoding engine's own thread.

The engine steps in one thread (torch releases the GIL while it computes, so the event
loop keeps serving); requests hand it jobs and receive tokens through an asyncio queue
each. What one engine step produces for all its requests crosses to the event loop in one
`call_soon_threadsafe` (an _Outbox): each such call wakes the loop with a system call, and
under load one step yields a token for dozens of requests. A stream reader takes every
token waiting for it at once and decodes their text there, on the event loop (with a
tokenizer of its own), so the engine's thread spends nothing on text and a busy server
sends fewer, larger chunks instead of falling behind. The scheduler also owns the
server's state: loading, ready, draining (SIGTERM: nothing new is accepted, what runs
finishes).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback

from gitcli.generate.continuous import ContinuousEngine, Job
from gitcli.serve.errors import overloaded
from gitcli.serve.openai_format import TextDeltas

LOADING, READY, DRAINING = "loading", "ready", "draining"


class _Outbox:
    """Events the engine thread posts during a step, handed to the event loop together."""

    def __init__(self):
        self._items: list[tuple[Ticket, tuple]] = []  # touched by the engine thread only

    def put(self, ticket: "Ticket", event: tuple) -> None:
        self._items.append((ticket, event))

    def flush(self) -> None:
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ticket, event in items:
            by_loop.setdefault(ticket.loop, []).append((ticket, event))
        for loop, group in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, group)
            except RuntimeError:  # the loop is gone (server stopped): nobody is listening
                for ticket, _ in group:
                    ticket.job.cancel()


def _deliver(group: list) -> None:
    for ticket, event in group:
        ticket.queue.put_nowait(event)


class Ticket:
    """One submitted job as the asyncio side sees it: its tokens as they come, then its end."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, wake, outbox: _Outbox, decode=None):
        self.job = job
        self.route = ""
        self.start = time.perf_counter()
        # a streamed job's text, decoded by the reader (event loop) from the tokens so far
        self.deltas = TextDeltas(decode) if decode is not None else None
        self.first_token: float | None = None  # perf_counter time of the first token
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox
        self._wake = wake
        job.on_token = self._on_token
        job.on_finish = self._on_finish

    # engine thread
    def _on_token(self, job: Job, token: int) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if self.deltas is None:
            return  # nobody reads single tokens: the loop is woken once, at the end
        self._post(("token", len(job.tokens)))  # how many tokens are there now

    def _on_finish(self, job: Job) -> None:
        self._post(("done", len(job.tokens)))

    def _post(self, event) -> None:
        self._outbox.put(self, event)  # sent when the engine's step ends

    # event loop

    async def text_events(self):
        """Yields the text gained since the last yield (a streaming ticket's): every token
        waiting is taken at once and decoded together. Returns when the job has ended
        (`self.job` is final then)."""
        done, decoded = False, 0
        while not done:
            kind, count = await self.queue.get()
            done = kind == "done"
            while not done and not self.queue.empty():
                kind, count = self.queue.get_nowait()
                done = kind == "done"
            if count > decoded:
                decoded = count
                yield self.deltas.delta(self.job.tokens[:count])

    async def finished(self) -> Job:
        while (await self.queue.get())[0] != "done":
            pass
        return self.job

    def cancel(self) -> None:
        if not self.job.done:
            self.job.cancel()
            self._wake()


class Scheduler:
    """Loading until `start` is given the engine (the model loads while the server answers
    /health), then ready, then draining."""

    def __init__(self, engine: ContinuousEngine | None = None, max_queue: int = 256):
        self.engine = engine
        self.max_queue = max_queue
        self.state = LOADING
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._outbox = _Outbox()
        self._stream_text = None  # token ids -> text, with a tokenizer of the event loop's own

    def start(self, engine: ContinuousEngine | None = None) -> None:
        if engine is not None:
            self.engine = engine
        self._stream_text = self.engine.decoder.detached_text()
        self._thread = threading.Thread(target=self._run, name="gitcap-engine", daemon=True)
        self._thread.start()
        if self.state == LOADING:  # a drain that came while loading stays a drain
            self.state = READY

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def drain(self) -> None:
        """Accept nothing new; what is queued or running finishes."""
        self.state = DRAINING

    def idle(self) -> bool:
        return self.engine is None or not self.engine.has_work()

    def wait_idle(self, poll: float = 0.05) -> None:
        while not self.idle():
            time.sleep(poll)

    @property
    def queue_depth(self) -> int:
        return self.engine.waiting if self.engine is not None else 0

    @property
    def running(self) -> int:
        return self.engine.running if self.engine is not None else 0

    def check_open(self) -> None:
        """503 unless new requests are taken (loading or draining)."""
        if self.state != READY:
            raise overloaded(f"the server is {self.state}; try again later", retry_after=5)

    def submit(self, job: Job, stream_text: bool = False) -> Ticket:
        """Hand a job to the engine (from the event loop); 503 when draining or full."""
        self.check_open()
        if self.engine.waiting >= self.max_queue:
            raise overloaded(f"the queue is full ({self.max_queue} requests waiting); try again shortly")
        decode = self._stream_text if stream_text else None
        ticket = Ticket(job, asyncio.get_running_loop(), self._wake, self._outbox, decode)
        self.engine.submit(job)
        self._wake()
        return ticket

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self.engine.has_work():
                    self._cond.wait()
                if self._stop:
                    break
            try:
                self.engine.step()
            except Exception as exc:  # a fault outside any one job: fail what is there, keep serving
                traceback.print_exc(file=sys.stderr)
                self.engine.fail_all(exc)
            self._outbox.flush()
