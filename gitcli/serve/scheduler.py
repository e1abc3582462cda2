"""The bridge between asyncio requests and the decoding engine's own thread.

The engine steps in one thread (torch releases the GIL while it computes, so the event
loop keeps serving); requests hand it jobs and receive tokens through an asyncio queue
filled with `call_soon_threadsafe`. The scheduler also owns the server's state: loading,
ready, draining (SIGTERM: nothing new is accepted, what runs finishes).
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


class Ticket:
    """One submitted job as the asyncio side sees it: its tokens as they come, then its end."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop, wake, decode=None):
        self.job = job
        self.route = ""
        self.start = self.submitted = time.perf_counter()
        # streamed text is decoded on the engine's thread: the tokenizer is used by one thread
        self.deltas = TextDeltas(decode) if decode is not None else None
        self.first_token: float | None = None  # perf_counter time of the first token
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._wake = wake
        job.on_token = self._on_token
        job.on_finish = self._on_finish

    # engine thread
    def _on_token(self, job: Job, token: int) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        if self.deltas is None:
            return  # nobody reads single tokens: the loop is woken once, at the end
        self._post(("token", token, self.deltas.delta(job.tokens)))

    def _on_finish(self, job: Job) -> None:
        self._post(("done", None, ""))

    def _post(self, event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is gone (server stopped): nobody is listening
            self.job.cancel()

    # event loop
    async def events(self):
        """Yields (token id, text delta) per token of a streaming ticket (nothing for the
        others); returns when the job has ended (`self.job` is final then)."""
        while True:
            kind, token, delta = await self._events.get()
            if kind == "done":
                return
            yield token, delta

    async def text_events(self):
        async for _, delta in self.events():
            yield delta

    async def finished(self) -> Job:
        async for _ in self.events():
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

    def start(self, engine: ContinuousEngine | None = None) -> None:
        if engine is not None:
            self.engine = engine
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
        decode = self.engine.decoder.text if stream_text else None
        ticket = Ticket(job, asyncio.get_running_loop(), self._wake, decode)
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
