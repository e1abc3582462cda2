"""The HTTP API against the official `openai` client and httpx: answers equal what
`gitcap caption` / `ask` print, streaming, usage, errors, limits, disconnects, metrics.
One in-process server for the module (tiny untrained model)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import threading
import time

import httpx
import openai
import pytest
from PIL import Image

from gitcli.config import GenerationConfig
from support.serve_fixtures import running_server, slow_endless

MAX_IMAGE_BYTES = 50_000
MAX_PIXELS = 1_000_000


@pytest.fixture(scope="module")
def server(tiny_captioner):
    with running_server(tiny_captioner, max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_PIXELS) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def pngs(scene_images):
    out = []
    for image in scene_images:
        buf = io.BytesIO()
        image.save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def alone(captioner, png: bytes, question: str | None, **options):
    """What `gitcap caption` / `ask` print for this image by itself (their defaults)."""
    from gitcli.infer import run_on_images

    options.setdefault("max_new_tokens", 20 if question is None else 10)
    path = _tmp_png(png)
    [result] = run_on_images(captioner, "fp32", [path], [question],
                             GenerationConfig(**options), batch_size=1)
    return result.generation


def _tmp_png(png: bytes):
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.mkdtemp(prefix="gitcap-serve-test-"))
    path = folder / "image.png"
    path.write_bytes(png)
    return path


def chat(client, png: bytes, question: str | None = None, **kwargs):
    content = [{"type": "image_url", "image_url": {"url": data_url(png)}}]
    if question is not None:
        content.append({"type": "text", "text": question})
    return client.chat.completions.create(model="gitcap-tiny", messages=[{"role": "user", "content": content}],
                                          **kwargs)


def metric(server, name: str, **labels) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# ---- answers ---------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["gitcap-tiny"]
    assert httpx.get(server.url + "/health").json() == {"status": "ready"}


def test_chat_caption_and_question_equal_the_cli_with_usage(server, client, pngs, tiny_captioner):
    want = alone(tiny_captioner, pngs[0], None)
    got = chat(client, pngs[0])
    assert got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == ("length" if len(want.token_ids) == 20 else "stop")
    stopped = got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == len(want.token_ids) + stopped  # the EOS is generated too
    assert got.usage.prompt_tokens == 16  # the tiny preset's 4x4 patch grid; its caption prompt is empty

    question = "what color is the circle?"
    want = alone(tiny_captioner, pngs[1], question)
    got = chat(client, pngs[1], question, max_tokens=10)
    assert got.choices[0].message.content == want.text
    prompt_ids = tiny_captioner.tokenizer(f"Question: {question} Answer:", add_special_tokens=False)["input_ids"]
    assert got.usage.prompt_tokens == 16 + len(prompt_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streaming_adds_up_to_the_answer_and_ends_with_usage(client, pngs, tiny_captioner):
    want = alone(tiny_captioner, pngs[2], None, max_new_tokens=15)
    chunks = list(chat(client, pngs[2], max_tokens=15, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= min(2, len(want.token_ids))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(want.token_ids)


def test_multipart_caption_and_ask_equal_the_cli(server, pngs, tiny_captioner):
    r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[3], "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["caption"] == alone(tiny_captioner, pngs[3], None).text
    assert r.json()["model"] == "gitcap-tiny" and r.json()["usage"]["prompt_tokens"] == 16

    r = httpx.post(server.url + "/v1/ask", files={"image": ("x.png", pngs[4], "image/png")},
                   data={"question": "how many shapes are there?", "beams": "3", "max_tokens": "6"})
    assert r.status_code == 200, r.text
    want = alone(tiny_captioner, pngs[4], "how many shapes are there?", beams=3, max_new_tokens=6)
    assert r.json()["answer"] == want.text and r.json()["question"] == "how many shapes are there?"


def test_greedy_requests_arriving_while_others_decode_answer_what_each_gives_alone(server, pngs, tiny_captioner):
    lengths = [20, 3, 12, 20, 7, 1, 16, 9]
    specs = [(pngs[i % len(pngs)], None if i % 2 else "where is the square?", n) for i, n in enumerate(lengths)]
    widths = []

    def send(spec, delay):
        png, question, n = spec
        time.sleep(delay)
        client = openai.OpenAI(base_url=server.api_url, api_key="unused", max_retries=0)
        return chat(client, png, question, max_tokens=n).choices[0].message.content

    def watch(done):
        while not done.is_set():
            widths.append(server.scheduler.running)
            time.sleep(0.002)

    # answers run to their max_tokens (EOS never wins), so rows of different lengths overlap
    with slow_endless(tiny_captioner, seconds_per_step=0.01):
        want = [alone(tiny_captioner, png, q, max_new_tokens=n).text for png, q, n in specs]
        done = threading.Event()
        watcher = threading.Thread(target=watch, args=(done,))
        watcher.start()
        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            got = list(pool.map(send, specs, [0.03 * i for i in range(len(specs))]))
        done.set()
        watcher.join()
    assert got == want
    assert max(widths) >= 3  # requests joined a batch that was decoding


# ---- refusals ----------------------------------------------------------------------
@pytest.mark.parametrize("change, words", [
    (lambda b: b["messages"][0]["content"].append(b["messages"][0]["content"][0]), "one image"),
    (lambda b: b.update(n=2), "n must be 1"),
    (lambda b: b.update(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]), "tools"),
    (lambda b: b["messages"][0].update(content="hello"), "image_url"),
    (lambda b: b["messages"].insert(0, {"role": "system", "content": "be brief"}), "one user message"),
    (lambda b: b.update(temperature=-1), "temperature"),
    (lambda b: b.update(max_tokens=0), "max_tokens"),
    (lambda b: b.update(ignore_eos="yes"), "ignore_eos"),
    (lambda b: b["messages"][0]["content"][0]["image_url"].update(url="http://example.com/a.png"),
     "--allow-image-urls"),
    (lambda b: b["messages"][0]["content"][0]["image_url"].update(url="data:image/png;base64,iVBORw0K"),
     "image"),
    (lambda b: b.update(max_tokens=100_000), "positions"),
])
def test_what_the_model_cannot_do_is_a_400_that_says_so(server, pngs, change, words):
    body = {"model": "gitcap-tiny",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(pngs[0])}},
                                                      {"type": "text", "text": "what color?"}]}]}
    change(body)
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error" and "code" in error


def test_ignore_eos_runs_an_answer_to_max_tokens(server, client, pngs, tiny_captioner):
    """vLLM's `ignore_eos` (the openai client's extra_body): the answer goes on past its end
    to max_tokens, as the batch decoder without EOS gives it. The untrained model rarely
    says EOS, so the engine here takes a token it says (the first new one after two) for EOS."""
    full = alone(tiny_captioner, pngs[0], None, max_new_tokens=12)
    ids = full.token_ids
    end = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    decoder = server.scheduler.engine.decoder
    real_eos, decoder.eos = decoder.eos, ids[end]
    try:
        stopped = chat(client, pngs[0], max_tokens=12, temperature=0)
        ignoring = chat(client, pngs[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    finally:
        decoder.eos = real_eos
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == end + 1
    assert ignoring.choices[0].finish_reason == "length" and ignoring.usage.completion_tokens == 12
    assert ignoring.choices[0].message.content == full.text


def test_ignore_eos_with_beam_search_is_a_400(tiny_captioner, pngs):
    with running_server(tiny_captioner, generation=GenerationConfig(beams=2)) as beam_server:
        r = httpx.post(beam_server.url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(pngs[0])}}]}],
            "ignore_eos": True})
    assert r.status_code == 400 and "beam search" in r.json()["error"]["message"]


def test_the_openai_client_sees_a_bad_request(client, pngs):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, pngs[0], n=2)
    assert "n must be 1" in info.value.message


def _big_pixels_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (1001, 1000), "white").save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize("payload, status, words", [
    (b"not an image at all", 400, "not an image"),
    (None, 400, "decode"),  # a truncated PNG
    ("big-pixels", 400, "pixels"),
    ("ppm", 400, "not an image"),  # Pillow reads it, but only photo formats are opened, as everywhere
    (b"\x89PNG" + b"\0" * (MAX_IMAGE_BYTES + 10), 413, "limit"),
])
def test_bad_uploads(server, pngs, payload, status, words):
    if payload is None:
        payload = pngs[0][: len(pngs[0]) // 2]
    elif payload == "big-pixels":
        payload = _big_pixels_png()
        assert len(payload) < MAX_IMAGE_BYTES
    elif payload == "ppm":
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "white").save(buf, "PPM")
        payload = buf.getvalue()
    r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", payload, "image/png")})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_malformed_bodies_are_400(server, pngs):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", content=b"[" * 60_000 + b"]" * 60_000)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/caption", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/caption", data={"max_tokens": "3"})
    assert r.status_code == 400 and "'image'" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/ask", files={"image": ("x.png", pngs[0], "image/png")})
    assert r.status_code == 400 and "question" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[0], "image/png")}, data={"top_p": "abc"})
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_a_bad_request_in_a_busy_batch_fails_alone(server, pngs, tiny_captioner):
    """Good requests decode together with one whose image is broken and one whose decoding
    is refused after its prefill (too long for the model); only those two fail."""
    want = [alone(tiny_captioner, png, None).text for png in pngs[:4]]

    def good(png):
        return httpx.post(server.url + "/v1/caption", files={"image": ("x.png", png, "image/png")}, timeout=60)

    def too_long():
        return httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[5], "image/png")},
                          data={"max_tokens": "5000"}, timeout=60)

    def broken():
        return httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[5][:100], "image/png")}, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        goods = [pool.submit(good, png) for png in pngs[:2]]
        bad = [pool.submit(too_long), pool.submit(broken)]
        goods += [pool.submit(good, png) for png in pngs[2:4]]
        answers = [f.result() for f in goods]
        failures = [f.result() for f in bad]
    assert [r.status_code for r in failures] == [400, 400]
    assert [r.json()["caption"] for r in answers] == want


# ---- disconnects and metrics -------------------------------------------------------
def test_a_client_that_disconnects_leaves_the_batch(server, pngs, tiny_captioner):
    before = metric(server, "gitcap_requests_total", route="/v1/caption", outcome="cancelled")
    with slow_endless(tiny_captioner, seconds_per_step=0.02):
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[0], "image/png")},
                       data={"max_tokens": "200"}, timeout=httpx.Timeout(5, read=0.5))
        deadline = time.monotonic() + 3  # 200 slow steps would take 4 s
        while server.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.scheduler.running == 0 and server.scheduler.queue_depth == 0
    deadline = time.monotonic() + 3
    while metric(server, "gitcap_requests_total", route="/v1/caption", outcome="cancelled") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_streaming_client_that_disconnects_leaves_the_batch(server, client, pngs, tiny_captioner):
    with slow_endless(tiny_captioner, seconds_per_step=0.02):
        stream = chat(client, pngs[1], max_tokens=200, stream=True)
        next(iter(stream))
        stream.close()
        deadline = time.monotonic() + 3
        while server.scheduler.running and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.scheduler.running == 0


def test_metrics_count_requests_tokens_and_latency(server, pngs):
    ok_before = metric(server, "gitcap_requests_total", route="/v1/caption", outcome="ok")
    tokens_before = metric(server, "gitcap_generated_tokens_total")
    bad_before = metric(server, "gitcap_requests_total", route="/v1/caption", outcome="bad_request")
    r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[0], "image/png")})
    httpx.post(server.url + "/v1/caption", files={"image": ("x.png", b"nope", "image/png")})
    assert metric(server, "gitcap_requests_total", route="/v1/caption", outcome="ok") == ok_before + 1
    assert metric(server, "gitcap_requests_total", route="/v1/caption", outcome="bad_request") == bad_before + 1
    assert metric(server, "gitcap_generated_tokens_total") == tokens_before + r.json()["usage"]["completion_tokens"]
    assert metric(server, "gitcap_request_latency_seconds_count", route="/v1/caption") >= 1
    assert metric(server, "gitcap_time_to_first_token_seconds_count", route="/v1/caption") >= 1
    text = httpx.get(server.url + "/metrics").text
    assert "gitcap_queue_depth" in text and "gitcap_running_batch_size" in text


def test_a_decoding_fault_is_a_500_in_the_error_shape_and_the_server_goes_on(server, pngs, tiny_captioner):
    def broken(module, args, output):
        raise RuntimeError("simulated device fault")

    handle = tiny_captioner.lm.register_forward_hook(broken)
    try:
        r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[0], "image/png")})
    finally:
        handle.remove()
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error" and "simulated device fault" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[0], "image/png")})
    assert r.status_code == 200


def test_a_client_that_leaves_mid_upload_is_counted_as_cancelled(server, pngs):
    import socket
    from urllib.parse import urlparse

    before = metric(server, "gitcap_requests_total", route="/v1/caption", outcome="cancelled")
    address = urlparse(server.url)
    with socket.create_connection((address.hostname, address.port)) as sock:
        sock.sendall(b"POST /v1/caption HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 5000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; "
                     b"filename=\"x.png\"\r\n\r\n" + pngs[0][:50])
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while metric(server, "gitcap_requests_total", route="/v1/caption", outcome="cancelled") == before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert httpx.post(server.url + "/v1/caption", files={"image": ("x.png", pngs[0], "image/png")}).status_code == 200


def test_the_openapi_schema_describes_the_bodies(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    form = paths["/v1/ask"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["image", "question"]
    assert "messages" in paths["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert httpx.get(server.url + "/docs").status_code == 200


def test_sampling_draws_afresh_unless_a_seed_is_given(client, pngs, tiny_captioner):
    def sample(**kwargs):
        return chat(client, pngs[2], max_tokens=20, temperature=1.5, **kwargs).choices[0].message.content

    assert sample(seed=7) == sample(seed=7) == alone(tiny_captioner, pngs[2], None, max_new_tokens=20,
                                                     temperature=1.5, seed=7).text
    assert len({sample() for _ in range(4)}) > 1


def test_a_stream_on_the_wire_is_chunked_sse_from_the_role_to_done(server, pngs, tiny_captioner):
    want = alone(tiny_captioner, pngs[3], None, max_new_tokens=12)
    body = {"model": "gitcap-tiny", "max_tokens": 12, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(pngs[3])}}]}]}
    with httpx.stream("POST", server.api_url + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert "content-length" not in response.headers  # a stream, not an empty body
        raw = "".join(response.iter_text())
    events = [line.removeprefix("data: ") for line in raw.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in raw.split("\n\n") if line)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len({c["id"] for c in chunks}) == 1
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:] if c["choices"])
    assert text == want.text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["length" if len(want.token_ids) == 12 else "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= len(want.token_ids)
