"""A `gitcap serve` app running in this process, for API and browser tests.

    from support.serve_fixtures import running_server, tiny_server  # noqa: F401 (fixture)

    def test_x(tiny_server):
        httpx.get(tiny_server.url + "/health")

`tiny_server` is module-scoped (one server per test module): the session's untrained
tiny captioner behind uvicorn on a free loopback port, served from a thread.
`running_server(captioner, **ServeConfig fields)` starts one with other options.
`slow_endless(captioner)` makes answers long and slow for tests of disconnects and
draining (EOS never wins; every forward pass sleeps a little).
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import pytest

TINY_MODEL_ID = "gitcap-tiny"


@dataclass
class RunningServer:
    url: str  # http://127.0.0.1:PORT, no trailing slash
    app: object  # the FastAPI app: .state.scheduler, .state.metrics, .state.config
    captioner: object

    @property
    def api_url(self) -> str:
        return self.url + "/v1"  # base_url for the openai client

    @property
    def scheduler(self):
        return self.app.state.scheduler


@contextlib.contextmanager
def running_server(captioner, *, load=None, on_load_error=None, **options):
    """`captioner` behind a server on a free loopback port (or None and `load`, which runs
    once the server is up, as `gitcap serve` loads its model); `options` are ServeConfig's."""
    import uvicorn

    from gitcli.serve.app import create_app
    from gitcli.serve.config import ServeConfig
    from gitcli.serve.server import bind

    options.setdefault("model_id", TINY_MODEL_ID)
    app = create_app(captioner, ServeConfig(**options), load=load, on_load_error=on_load_error)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="test-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield RunningServer(f"http://127.0.0.1:{port}", app, captioner)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_captioner):
    with running_server(tiny_captioner) as server:
        yield server


@contextlib.contextmanager
def slow_endless(captioner, seconds_per_step: float = 0.01):
    """While active, the LM never emits EOS and each forward pass takes `seconds_per_step`
    longer: an answer runs to its max_tokens, slowly enough to act while it decodes."""
    eos = captioner.tokenizer.eos_token_id

    def hook(module, args, output):
        time.sleep(seconds_per_step)
        output.logits[..., eos] = float("-inf")
        return output

    handle = captioner.lm.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
