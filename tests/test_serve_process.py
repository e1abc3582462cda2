"""A real server process: SIGTERM drains (503 for newcomers, running answers finish) and
exits 0; `gitcap serve` prints its URL and refuses bad options in one line."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from typer.testing import CliRunner

from gitcli.cli import app

# The tiny preset with answers that never end early and take 20 ms a token, so a request
# is still decoding when the signal arrives.
SERVER = r"""
import sys, time, torch
from gitcli.data.synthetic import vocabulary
from gitcli.model.captioner import build_captioner
from gitcli.model.tiny import tiny_model_config
from gitcli.serve.app import create_app
from gitcli.serve.config import ServeConfig
from gitcli.serve.server import bind, serve

torch.manual_seed(0)
model = build_captioner(tiny_model_config(), vocabulary=vocabulary()).eval()
eos = model.tokenizer.eos_token_id
def hook(module, args, output):
    time.sleep(0.02)
    output.logits[..., eos] = float("-inf")
    return output
model.lm.register_forward_hook(hook)
sock = bind("127.0.0.1", 0)
print(sock.getsockname()[1], flush=True)
serve(create_app(model, ServeConfig(model_id="gitcap-tiny")), sock)
print("exited cleanly", flush=True)
"""


def _png(scene_images) -> bytes:
    buf = io.BytesIO()
    scene_images[0].save(buf, "PNG")
    return buf.getvalue()


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health", timeout=1).json() == {"status": "ready"}:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_sigterm_stops_accepting_finishes_what_runs_and_exits_0(scene_images):
    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env())
    try:
        url = f"http://127.0.0.1:{int(proc.stdout.readline())}"
        _wait_ready(url, proc)
        png = _png(scene_images)
        result = {}

        def long_request():
            result["r"] = httpx.post(url + "/v1/caption", files={"image": ("x.png", png, "image/png")},
                                     data={"max_tokens": "100"}, timeout=60)  # 100 tokens x 20 ms

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 10
        while "gitcap_running_batch_size 1.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "draining"}
        refused = httpx.post(url + "/v1/caption", files={"image": ("x.png", png, "image/png")})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json()["error"]["type"] == "server_error"
        thread.join(timeout=30)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 100
        assert proc.wait(timeout=30) == 0
        assert "exited cleanly" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_gitcap_serve_prints_its_url_and_exits_0_on_sigterm():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gitcli", "serve", "--preset", "tiny", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "gitcap-tiny"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        err = proc.stderr.read()
        assert url in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


runner = CliRunner()


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["serve", "--preset", "tiny", "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port}" in result.output and "in use" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "/nonexistent/ckpt"], "/nonexistent/ckpt"),
    (["--preset", "huge"], "preset"),
    ([], "--checkpoint"),
    (["--preset", "tiny", "--scheduler", "eager"], "--scheduler"),
    (["--preset", "tiny", "--beams", "2", "--temperature", "0.5"], "exclusive"),
])
def test_bad_options_are_one_line(args, words):
    result = runner.invoke(app, ["serve", "--port", "0", *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_help_has_an_example():
    result = runner.invoke(app, ["serve", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "gitcap serve" in result.output


def test_health_says_loading_until_the_model_is_loaded(tiny_captioner, scene_images):
    from support.serve_fixtures import running_server

    release = threading.Event()

    def load():
        release.wait(30)
        return tiny_captioner, None

    png = _png(scene_images)
    with running_server(None, load=load) as server:
        health = httpx.get(server.url + "/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        refused = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", png, "image/png")})
        assert refused.status_code == 503 and refused.headers["Retry-After"] and "loading" in refused.text
        release.set()
        deadline = time.monotonic() + 10
        while httpx.get(server.url + "/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", png, "image/png")})
        assert r.status_code == 200 and isinstance(r.json()["caption"], str)


def test_a_checkpoint_that_fails_to_load_is_one_error_line_after_the_url(tiny_checkpoint, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    result = runner.invoke(app, ["serve", "--checkpoint", str(broken), "--port", "0"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert "serving at http://127.0.0.1:" in lines[0] and "broken" in lines[0]
    assert lines[-1].startswith("error:") and "Traceback" not in result.output


def test_the_whole_batch_scheduler_serves_the_same_answers(tiny_captioner, scene_images):
    """--scheduler whole (the benchmark's baseline) runs the same engine, admitting only into
    an empty batch; it answers the same text."""
    from support.serve_fixtures import running_server

    png = _png(scene_images)
    answers = []
    for scheduler in ("whole", "continuous"):
        with running_server(tiny_captioner, scheduler=scheduler) as server:
            assert server.scheduler.engine.mode == scheduler
            r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", png, "image/png")})
            assert r.status_code == 200
            answers.append(r.json()["caption"])
    assert answers[0] == answers[1]


def test_freezing_takes_what_is_alive_out_of_the_collectors_scans():
    import gc

    from gitcli.serve.server import freeze_loaded_objects

    loaded = [object()]  # a container: tracked by the collector
    assert any(o is loaded for o in gc.get_objects())
    try:
        freeze_loaded_objects()
        assert not any(o is loaded for o in gc.get_objects())  # in the permanent generation now
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    assert any(o is loaded for o in gc.get_objects())


def test_gitcap_serve_freezes_what_the_model_load_left_alive(monkeypatch):
    import asyncio
    import gc

    frozen = []

    def load_then_stop(app, sock, **_):  # in place of uvicorn: load the model, then stop
        asyncio.run(app.state.service.load_then_start())
        frozen.append(gc.get_freeze_count())
        app.state.scheduler.stop()

    monkeypatch.setattr("gitcli.serve.server.serve", load_then_stop)
    gc.unfreeze()
    try:
        result = runner.invoke(app, ["serve", "--preset", "tiny", "--port", "0"])
    finally:
        gc.unfreeze()
    assert result.exit_code == 0, result.output
    assert "ready" in result.output and frozen and frozen[0] > 0
