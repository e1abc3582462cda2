"""Running the app under uvicorn, with the shutdown a deployment expects.

SIGTERM (or Ctrl-C): the server starts draining: /health says "draining", new requests
get 503, queued and running requests finish and their answers are sent, then it exits 0.
A second signal stops at once.
"""

from __future__ import annotations

import gc
import socket
import threading

import uvicorn

from gitcli.errors import GitcapError


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the server starts so a taken port is one line."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise GitcapError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise GitcapError(f"port {port} on {host} is in use; pick another with --port") from None
        raise GitcapError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def freeze_loaded_objects() -> None:
    """Move everything alive now (the model, torch, transformers: about half a million
    objects for the demo checkpoint) out of the garbage collector's sight, as vLLM does
    after loading. A full collection walks every tracked object while holding the GIL, and
    a serving process allocates fast enough to trigger one every few seconds: each stalled
    the engine and every connection for about 0.3 s on a 2-core CPU; with the loaded
    objects frozen it takes about 0.02 s. What stays alive for the server's whole life is
    never garbage, so nothing is lost by never scanning it again."""
    gc.collect()
    gc.freeze()


class DrainingServer(uvicorn.Server):
    """uvicorn whose first exit signal drains the scheduler before shutting down."""

    def __init__(self, config: uvicorn.Config, scheduler):
        super().__init__(config)
        self.scheduler = scheduler
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        # uvicorn's own handler records the signal and raises it again after shutdown,
        # which would end the process with the signal's status instead of 0
        if self._draining:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self.scheduler.drain()
        threading.Thread(target=self._exit_when_idle, name="gitcap-drain", daemon=True).start()

    def _exit_when_idle(self) -> None:
        self.scheduler.wait_idle()
        self.should_exit = True  # uvicorn then waits for the responses still being sent


def serve(app, sock: socket.socket, *, log_level: str = "warning") -> None:
    """Serve `app` on the bound `sock` until a signal drains it."""
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_graceful_shutdown=None,
                            access_log=False)
    server = DrainingServer(config, app.state.scheduler)
    app.state.server = server  # so a failed model load can stop it
    server.run(sockets=[sock])


