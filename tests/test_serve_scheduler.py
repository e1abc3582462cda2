"""The engine thread's hand-over to the event loop: one wake-up per engine step whatever
the number of requests, and a stream that fell behind catches up in one chunk with the
same text."""

import asyncio
import threading

from gitcli.generate.continuous import Job
from gitcli.serve.scheduler import Ticket, _Outbox


def _job() -> Job:
    return Job(pixel_values=None, prompt="", config=None)


def test_one_step_of_many_requests_wakes_the_loop_once_and_streams_catch_up_whole():
    words = ["a", " red", " circle", " on", " the", " left"]

    async def main():
        loop = asyncio.get_running_loop()
        outbox = _Outbox()
        tickets = [Ticket(_job(), loop, lambda: None, outbox, decode=lambda ids: "".join(words[i] for i in ids))
                   for _ in range(8)]
        wakeups = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args: wakeups.append(args) or real(*args)

        def engine_step(token: int, last: bool) -> None:  # on another thread, as the engine runs
            for ticket in tickets:
                ticket.job.tokens.append(token)
                ticket.job.on_token(ticket.job, token)
                if last:
                    ticket.job.finish_reason = "stop"
                    ticket.job.on_finish(ticket.job)
            outbox.flush()

        for step in range(len(words)):  # six steps while nobody reads: the streams fall behind
            thread = threading.Thread(target=engine_step, args=(step, step == len(words) - 1))
            thread.start()
            thread.join()
        await asyncio.sleep(0)  # let the loop run what the engine handed over
        assert len(wakeups) == len(words)  # one per step, not one per request and token
        for ticket in tickets:
            chunks = [chunk async for chunk in ticket.text_events()]
            assert chunks == ["a red circle on the left"]  # all that waited, in one chunk

    asyncio.run(main())


def test_a_stream_that_keeps_up_gets_each_token_as_it_comes():
    async def main():
        loop = asyncio.get_running_loop()
        outbox = _Outbox()
        ticket = Ticket(_job(), loop, lambda: None, outbox, decode=lambda ids: " ".join(str(i) for i in ids))
        received = []

        async def reader():
            async for chunk in ticket.text_events():
                received.append(chunk)

        task = asyncio.ensure_future(reader())
        for token in range(3):
            ticket.job.tokens.append(token)
            ticket.job.on_token(ticket.job, token)
            outbox.flush()
            await asyncio.sleep(0.01)
        ticket.job.finish_reason = "length"
        ticket.job.on_finish(ticket.job)
        outbox.flush()
        await task
        assert received == ["0", " 1", " 2"]

    asyncio.run(main())
