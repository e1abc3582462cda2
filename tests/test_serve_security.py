"""A server with --api-key and --allow-image-urls: keys on every /v1/ route, the page and
health open; image URLs only through `gitcap fetch`'s address policy and size limit; the
queue's limit and the draining state."""

from __future__ import annotations

import asyncio
import base64
import http.server
import io
import threading

import httpx
import openai
import pytest

from gitcli.serve.config import exposure_warning
from support.serve_fixtures import running_server

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def server(tiny_captioner):
    with running_server(tiny_captioner, api_key=KEY, allow_image_urls=True, max_image_bytes=10_000) as running:
        yield running


@pytest.fixture(scope="module")
def png(scene_images):
    buf = io.BytesIO()
    scene_images[0].save(buf, "PNG")
    return buf.getvalue()


def message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def test_every_v1_route_needs_the_key(server, png):
    files = {"image": ("x.png", png, "image/png")}
    for method, path, kwargs in [("GET", "/v1/models", {}), ("POST", "/v1/caption", {"files": files}),
                                 ("POST", "/v1/ask", {"files": files, "data": {"question": "what?"}}),
                                 ("POST", "/v1/chat/completions", {"json": {"messages": []}})]:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Bearer {KEY}x"}]:
            r = httpx.request(method, server.url + path, headers=headers, **kwargs)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.url + "/v1/caption", files=files, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and isinstance(r.json()["caption"], str)
    assert httpx.get(server.url + "/health").status_code == 200  # open: load balancers probe it


def test_the_openai_client_with_and_without_the_key(server, png):
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.api_url, api_key="wrong", max_retries=0).chat.completions.create(
            model="gitcap-tiny", messages=message(url))
    ok = openai.OpenAI(base_url=server.api_url, api_key=KEY, max_retries=0).chat.completions.create(
        model="gitcap-tiny", messages=message(url))
    assert ok.choices[0].message.content is not None


@pytest.fixture
def loopback_image_host(png):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/scene.png"
    httpd.shutdown()


def test_image_urls_go_through_the_fetch_address_policy(server, loopback_image_host):
    headers = {"Authorization": f"Bearer {KEY}"}
    for url in [loopback_image_host, "http://169.254.169.254/latest/meta-data", "http://[::1]:9/x.png",
                "http://10.0.0.1/x.png"]:
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers, json={"messages": message(url)})
        assert r.status_code == 400, r.text
        assert "blocked_address" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, json={"messages": message("ftp://x/y.png")})
    assert r.status_code == 400


def test_a_data_url_over_the_byte_limit_is_413(server):
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + bytes(20_000)).decode()
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"messages": message(big)})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"


def test_non_loopback_without_a_key_is_warned_about():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("localhost", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    assert "--api-key" in exposure_warning("0.0.0.0", None)
    assert "--api-key" in exposure_warning("192.168.1.5", None)


def test_queue_full_and_draining_are_503_with_retry_after(tiny_captioner):
    """The scheduler's limits, with no engine thread running (nothing leaves the queue)."""
    from gitcli.config import GenerationConfig
    from gitcli.generate.continuous import ContinuousEngine, Job
    from gitcli.serve.errors import ApiError
    from gitcli.serve.scheduler import LOADING, READY, Scheduler

    import torch

    scheduler = Scheduler(ContinuousEngine(tiny_captioner), max_queue=2)
    job = lambda: Job(torch.zeros(3, 64, 64), "", GenerationConfig(max_new_tokens=2))  # noqa: E731

    async def scenario():
        assert scheduler.state == LOADING
        with pytest.raises(ApiError) as loading:
            scheduler.submit(job())
        scheduler.state = READY
        scheduler.submit(job())
        scheduler.submit(job())
        with pytest.raises(ApiError) as full:
            scheduler.submit(job())
        scheduler.drain()
        with pytest.raises(ApiError) as draining:
            scheduler.submit(job())
        return loading.value, full.value, draining.value

    for error in asyncio.run(scenario()):
        assert error.status == 503 and "Retry-After" in error.headers
    assert scheduler.queue_depth == 2


def test_an_allowed_image_url_is_fetched_and_captioned(server, loopback_image_host, png, tiny_captioner, monkeypatch):
    """With the address policy opened for this test (its image host is on loopback), the
    URL's image is what gets captioned; a body over the byte limit is 413."""
    import pathlib
    import tempfile

    import torch

    from gitcli.config import GenerationConfig
    from gitcli.fetch.policy import AddressPolicy
    from gitcli.infer import run_on_images

    monkeypatch.setattr(AddressPolicy, "allows", lambda self, ip: True)
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server.url + "/v1/chat/completions", headers=headers, json={"messages": message(loopback_image_host)})
    assert r.status_code == 200, r.text
    path = pathlib.Path(tempfile.mkdtemp()) / "scene.png"
    path.write_bytes(png)
    [want] = run_on_images(tiny_captioner, torch.device("cpu"), "fp32", [path], [None], GenerationConfig(), 1)
    assert r.json()["choices"][0]["message"]["content"] == want.generation.text

    server.app.state.config.max_image_bytes = len(png) - 1
    try:
        r = httpx.post(server.url + "/v1/chat/completions", headers=headers,
                       json={"messages": message(loopback_image_host)})
    finally:
        server.app.state.config.max_image_bytes = 10_000
    assert r.status_code == 413
