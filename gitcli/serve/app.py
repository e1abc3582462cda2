"""The FastAPI app: OpenAI-compatible chat completions, multipart caption/ask, models,
health, metrics and the page.

Bodies are read by hand, with the size limit applied while they stream in (a form parser
would spool any size to disk first), and every answer, error or not, is counted in the
metrics by route and outcome.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import secrets
import sys
import time
import traceback
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from gitcli import __version__
from gitcli.errors import GitcapError
from gitcli.generate.continuous import ContinuousEngine, Job
from gitcli.serve import openai_format as oai
from gitcli.serve.config import ServeConfig
from gitcli.serve.errors import ApiError, bad_request, error_body, outcome, too_large
from gitcli.serve.images import data_url_bytes, decode_image, fetch_image
from gitcli.serve.metrics import CONTENT_TYPE_LATEST, Metrics
from gitcli.serve.scheduler import READY, Scheduler, Ticket

PAGE = Path(__file__).with_name("page.html")
FORM_OVERHEAD = 64 * 1024  # multipart boundaries and the small fields beside the image
CLIENT_GONE = 499  # nginx's status for a client that closed the connection; never sent


class _ClientGone(Exception):
    pass


@dataclasses.dataclass
class _Model:
    captioner: object = None
    transform: Callable | None = None


@dataclasses.dataclass
class _Options:
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    beams: int | None = None
    seed: int | None = None
    ignore_eos: bool = False


class Service:
    """What the routes share: the engine's scheduler, the config, the metrics and the loaded
    model (none until it is loaded), with the plumbing every model route goes through."""

    def __init__(self, config: ServeConfig, *, captioner=None, device=None,
                 on_ready: Callable[[], None] | None = None, load: Callable[[], tuple] | None = None,
                 on_load_error: Callable[[BaseException], None] | None = None):
        self.config = config
        self.scheduler = Scheduler(max_queue=config.max_queue)
        self.metrics = Metrics()
        self.metrics.watch(lambda: self.scheduler.queue_depth, lambda: self.scheduler.running)
        self.model = _Model()
        self.created = int(time.time())
        self._given = (captioner, device)
        self._on_ready, self._load, self._on_load_error = on_ready, load, on_load_error

    # ---- the engine's lifetime --------------------------------------------------------
    def start(self, captioner, device) -> None:
        config = self.config
        self.model.captioner, self.model.transform = captioner, captioner.image_transform()
        self.scheduler.start(ContinuousEngine(captioner, device=device, precision=config.precision,
                                              max_batch_size=config.max_batch_size, mode=config.scheduler,
                                              max_prefill_batch=config.prefill_batch,
                                              max_waiting_steps=config.max_waiting_steps))
        if self._on_ready is not None:
            self._on_ready()

    async def load_then_start(self) -> None:
        try:
            self.start(*await asyncio.to_thread(self._load))
        except Exception as exc:
            if self._on_load_error is None:
                raise
            self._on_load_error(exc)

    @asynccontextmanager
    async def lifespan(self, app: FastAPI):
        loading = None
        if self._load is None:
            self.start(*self._given)
        else:
            loading = asyncio.create_task(self.load_then_start())
        yield
        if loading is not None and not loading.done():
            loading.cancel()
        self.scheduler.stop()

    # ---- plumbing ---------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        api_key = self.config.api_key
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compared in constant time: how long a wrong key takes says nothing about the right one
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is needed: send 'Authorization: Bearer KEY'",
                           "invalid_request_error", "invalid_api_key")

    async def answer(self, request: Request, route: str, handler: Handler) -> Response:
        start = time.perf_counter()
        try:
            self.check_key(request)
            response = await handler(self, request, start)
        except ApiError as exc:
            response = _error_response(exc)
        except (_ClientGone, ClientDisconnect):  # the client left (while uploading, or waiting)
            response = Response(status_code=CLIENT_GONE)
        except Exception as exc:  # a fault of the server: logged, and answered in the one error shape
            traceback.print_exc(file=sys.stderr)
            response = _error_response(ApiError(500, f"internal error: {type(exc).__name__}", "server_error",
                                                "internal_error"))
        if not getattr(request.state, "counted", False):
            self.metrics.requests.labels(route, outcome(response.status_code)).inc()
        return response

    async def read_body(self, request: Request, limit: int) -> bytes:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(f"the request body is over the limit of {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise too_large(f"the request body is over the limit of {limit} bytes")
        return bytes(body)

    async def pixels_from(self, data: bytes):
        def prepare():
            return self.model.transform(decode_image(data, self.config.max_image_pixels))

        return await asyncio.to_thread(prepare)  # decoding a large image must not stall the loop

    def make_job(self, pixels, question: str | None, options: _Options) -> Job:
        from gitcli.generate.inputs import prompts_for

        config = self.config
        gen = config.generation
        sampling = options.temperature is not None and options.temperature > 0
        gen = dataclasses.replace(
            gen,
            max_new_tokens=options.max_tokens or config.default_max_new_tokens(question),
            temperature=gen.temperature if options.temperature is None else options.temperature,
            top_p=gen.top_p if options.top_p is None else options.top_p,
            # a request that asks for sampling is not held to the server's default beam width
            beams=options.beams if options.beams is not None else (1 if sampling else gen.beams),
            seed=options.seed if options.seed is not None else (
                config.seed if config.seed is not None else secrets.randbits(31)),
        )
        try:
            gen.validate()
        except GitcapError as exc:
            raise bad_request(str(exc).replace("--max-new-tokens", "max_tokens").replace("--", ""),
                              "invalid_value") from None
        if options.ignore_eos and gen.beams > 1:
            raise bad_request("ignore_eos needs greedy or sampled decoding, not beam search", "invalid_value")
        return Job(pixels, prompts_for(self.model.captioner.config, [question])[0], gen,
                   ignore_eos=options.ignore_eos)

    def run(self, job: Job, start: float, route: str, stream_text: bool = False) -> Ticket:
        ticket = self.scheduler.submit(job, stream_text=stream_text)
        ticket.route, ticket.start = route, start  # latency counts from the request's arrival
        return ticket

    def record(self, ticket: Ticket) -> None:
        job, now, metrics = ticket.job, time.perf_counter(), self.metrics
        metrics.latency.labels(ticket.route).observe(now - ticket.start)
        metrics.ttft.labels(ticket.route).observe((ticket.first_token or now) - ticket.start)
        metrics.generated.inc(completion_tokens(job))
        metrics.prompt_tokens.inc(job.prompt_tokens)

    async def finished(self, request: Request, ticket: Ticket) -> Job:
        """The job's end, or _ClientGone (and the job cancelled) if the client leaves first."""
        result = asyncio.ensure_future(ticket.finished())
        watcher = asyncio.ensure_future(_disconnected(request.receive))
        try:
            done, _ = await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        finally:
            watcher.cancel()
        if result not in done:
            ticket.cancel()
            result.cancel()
            raise _ClientGone
        job = result.result()
        raise_for_job(job)
        self.record(ticket)
        return job

    # ---- what the model routes read from a request -----------------------------------
    async def form_request(self, request: Request, with_question: bool):
        config = self.config
        self.scheduler.check_open()
        body = await self.read_body(request, config.max_image_bytes + FORM_OVERHEAD)
        form = await _parse_form(request, body)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise bad_request("send the image as a multipart file field named 'image'", "missing_image")
        data = await upload.read()
        if len(data) > config.max_image_bytes:
            raise too_large(f"the image is over the limit of {config.max_image_bytes} bytes")
        question = None
        if with_question:
            question = form.get("question")
            if not isinstance(question, str) or not question.strip():
                raise bad_request("send the question as a form field named 'question'", "missing_question")
            question = question.strip()
        options = _Options(max_tokens=_form_int(form, "max_tokens", 1), temperature=_form_float(form, "temperature"),
                           top_p=_form_float(form, "top_p"), beams=_form_int(form, "beams", 1),
                           seed=_form_int(form, "seed", None))
        return self.make_job(await self.pixels_from(data), question, options), question

    async def image_bytes(self, url: str) -> bytes:
        config = self.config
        if url.startswith("data:"):
            return data_url_bytes(url, config.max_image_bytes)
        if url.startswith(("http://", "https://")):
            if not config.allow_image_urls:
                raise bad_request("image URLs are off on this server (start it with --allow-image-urls); "
                                  "send the image as a data: URL", "image_urls_disabled")
            return await fetch_image(url, config.max_image_bytes)
        raise bad_request("image_url must be a data: URL (or http(s) with --allow-image-urls)", "invalid_image_url")

    async def stream(self, ticket: Ticket, include_usage: bool):
        """A streamed completion's server-sent events as (text, last) pairs: the role chunk goes
        with the first text, and everything after the last token (the rest of the text, the
        finish reason, the usage, [DONE]) in one piece. Each piece is one write to the socket,
        and under load those writes are a large part of the event loop's time."""
        cid, created_at, status, model_id = oai.completion_id(), int(time.time()), CLIENT_GONE, self.config.model_id
        content = oai.ContentChunks(cid, model_id, created_at)
        opening = oai.chunk(cid, model_id, created_at, {"role": "assistant", "content": ""})
        try:
            async for delta in ticket.text_events():
                if delta:
                    yield opening + content(delta), False
                    opening = ""
            job = ticket.job
            try:
                raise_for_job(job)
            except ApiError as exc:
                status = exc.status
                yield opening + oai.sse(exc.body()) + oai.sse("[DONE]"), True
                return
            self.record(ticket)
            rest = ticket.deltas.rest(job.text) if ticket.deltas else ""
            closing = [opening, content(rest) if rest else "",
                       oai.chunk(cid, model_id, created_at, {}, job.finish_reason)]
            if include_usage:
                closing.append(oai.chunk(cid, model_id, created_at, {}, usage_=job_usage(job), with_choice=False))
            closing.append(oai.sse("[DONE]"))
            status = 200
            yield "".join(closing), True
        finally:
            ticket.cancel()  # a no-op when it ended; the client left otherwise
            self.metrics.requests.labels(ticket.route, outcome(status)).inc()


class EventStream(Response):
    """Server-sent events from an async iterator of (text, last) pairs.

    Starlette's StreamingResponse runs the body and a disconnect listener in a task group
    per response, and ends with an empty write of its own; here one watcher task cancels the
    ticket when the client leaves (the engine drops the job, and the iterator ends), and the
    last piece ends the body in the same write."""

    media_type = "text/event-stream"

    def __init__(self, events, on_disconnect: Callable[[], None]):
        # as StreamingResponse does: Response.__init__ would render an empty body and say so
        # in a Content-Length header
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_disconnect = events, on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        watcher = asyncio.ensure_future(_disconnected(receive))
        watcher.add_done_callback(lambda task: task.cancelled() or self.on_disconnect())
        last = False
        try:
            async for text, last in self.events:
                await send({"type": "http.response.body", "body": text.encode("utf-8"), "more_body": not last})
        except _ClientGone:
            pass  # the client left: there is nobody to end the body for
        finally:
            watcher.cancel()
            await self.events.aclose()
        if not last and not watcher.done():
            await send({"type": "http.response.body", "body": b"", "more_body": False})


Handler = Callable[[Service, Request, float], Awaitable[Response]]


def create_app(captioner, config: ServeConfig, *, device=None, on_ready: Callable[[], None] | None = None,
               load: Callable[[], tuple] | None = None,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """An app serving `captioner`; its engine thread starts and stops with the app's lifespan.

    With `load` (and `captioner` None) the model is loaded in a thread once the server is
    up: /health says "loading" and model routes answer 503 until `load()` returns
    (captioner, device); a failure goes to `on_load_error`.
    """
    config.validate()
    if (captioner is None) == (load is None):
        raise ValueError("give a captioner or a load function, not both")
    service = Service(config, captioner=captioner, device=device, on_ready=on_ready, load=load,
                      on_load_error=on_load_error)
    app = FastAPI(title="gitcap", version=__version__, lifespan=service.lifespan,
                  description="Captions and answers about images, in OpenAI's chat-completions format.")
    app.state.service = service
    app.state.scheduler, app.state.metrics, app.state.config = service.scheduler, service.metrics, config
    app.add_exception_handler(StarletteHTTPException, http_error)
    add_server_routes(app)
    add_model_routes(app)
    return app


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ---- the request bodies, for /docs (they are parsed by hand, with limits) ------------
def _form_schema(question: bool) -> dict:
    fields = {"image": {"type": "string", "format": "binary", "description": "the image file"},
              "max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0},
              "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
              "beams": {"type": "integer", "minimum": 1}, "seed": {"type": "integer"}}
    required = ["image"]
    if question:
        fields["question"] = {"type": "string"}
        required.append("question")
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "required": required, "properties": fields}}}}}


CHAT_SCHEMA = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["messages"],
    "properties": {
        "model": {"type": "string"},
        "messages": {"type": "array", "minItems": 1, "maxItems": 1, "description":
                     "one user message: content parts are one image_url (a data: URL) and optional text "
                     "(a question; none = caption)", "items": {"type": "object"}},
        "max_tokens": {"type": "integer", "minimum": 1}, "temperature": {"type": "number", "minimum": 0},
        "top_p": {"type": "number"}, "seed": {"type": "integer"}, "stream": {"type": "boolean"},
        "stream_options": {"type": "object"},
        "ignore_eos": {"type": "boolean", "description": "decode max_tokens tokens even past the end of the "
                       "answer (vLLM's ignore_eos: for benchmarks with fixed output lengths)"}}}}}}}


# ---- routes: each takes the app's Service from request.app.state -----------------
# (added to the app itself, in this order, as its own routes: not through an APIRouter,
# which this FastAPI would nest as one included-router entry in app.routes)
def add_server_routes(app: FastAPI) -> None:
    """The server's own routes: health, metrics, the page."""
    app.get("/health")(health)
    app.get("/metrics")(prometheus)
    app.get("/", response_class=HTMLResponse)(page)


def add_model_routes(app: FastAPI) -> None:
    """The API: keyed, and counted in the metrics by route and outcome."""
    app.get("/v1/models")(models)
    app.post("/v1/caption", openapi_extra=_form_schema(question=False))(caption)
    app.post("/v1/ask", openapi_extra=_form_schema(question=True))(ask)
    app.post(CHAT_ROUTE, openapi_extra=CHAT_SCHEMA)(chat)


def _service(request: Request) -> Service:
    return request.app.state.service


async def http_error(request: Request, exc: StarletteHTTPException):
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(error_body(str(exc.detail), kind, exc.status_code), status_code=exc.status_code)


async def health(request: Request):
    state = _service(request).scheduler.state
    return JSONResponse({"status": state}, status_code=200 if state == READY else 503)


async def prometheus(request: Request):
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


async def page():
    if not PAGE.is_file():
        return JSONResponse(error_body("the page is not installed", "not_found", 404), status_code=404)
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


async def models(request: Request):
    return await _service(request).answer(request, "/v1/models", _models)


async def _models(service: Service, request: Request, start: float) -> Response:
    return JSONResponse(oai.models_list(service.config.model_id, service.created))


async def caption(request: Request):
    return await _service(request).answer(request, "/v1/caption", _caption)


async def _caption(service: Service, request: Request, start: float) -> Response:
    job, _ = await service.form_request(request, with_question=False)
    job = await service.finished(request, service.run(job, start, "/v1/caption"))
    return JSONResponse({"caption": job.text, "model": service.config.model_id, "usage": job_usage(job)})


async def ask(request: Request):
    return await _service(request).answer(request, "/v1/ask", _ask)


async def _ask(service: Service, request: Request, start: float) -> Response:
    job, question = await service.form_request(request, with_question=True)
    job = await service.finished(request, service.run(job, start, "/v1/ask"))
    return JSONResponse({"question": question, "answer": job.text, "model": service.config.model_id,
                         "usage": job_usage(job)})


CHAT_ROUTE = "/v1/chat/completions"


async def chat(request: Request):
    return await _service(request).answer(request, CHAT_ROUTE, _chat)


async def _chat(service: Service, request: Request, start: float) -> Response:
    config = service.config
    service.scheduler.check_open()
    # a base64 data: URL is 4/3 of the image's size
    body = await service.read_body(request, config.max_image_bytes * 4 // 3 + FORM_OVERHEAD)
    chat_request = oai.parse_chat(oai.parse_json(body))
    data = await service.image_bytes(chat_request.image_url)
    options = _Options(max_tokens=chat_request.max_tokens, temperature=chat_request.temperature,
                       top_p=chat_request.top_p, seed=chat_request.seed, ignore_eos=chat_request.ignore_eos)
    job = service.make_job(await service.pixels_from(data), chat_request.question, options)
    ticket = service.run(job, start, CHAT_ROUTE, stream_text=chat_request.stream)
    if chat_request.stream:
        request.state.counted = True  # the stream counts its own outcome when it ends
        return EventStream(service.stream(ticket, chat_request.include_usage), on_disconnect=ticket.cancel)
    job = await service.finished(request, ticket)
    return JSONResponse(oai.chat_completion(oai.completion_id(), config.model_id, job.text,
                                            job.finish_reason, job_usage(job)))


# ---- helpers ---------------------------------------------------------------------
def completion_tokens(job: Job) -> int:
    """Generated tokens, the EOS that ended the answer included."""
    return len(job.tokens) + (1 if job.finish_reason == "stop" else 0)


def job_usage(job: Job) -> dict:
    return oai.usage(job.prompt_tokens, completion_tokens(job))


def raise_for_job(job: Job) -> None:
    if job.finish_reason == "error":
        if job.rejected:
            raise bad_request(job.error or "the request cannot be decoded", "invalid_value")
        raise ApiError(500, f"decoding failed: {job.error}", "server_error", "decoding_failed")
    if job.finish_reason == "cancelled":
        raise _ClientGone


async def _disconnected(receive) -> None:
    """Returns when the client has closed the connection (the body was read already, so the
    next ASGI message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _parse_form(request: Request, body: bytes):
    from starlette.formparsers import MultiPartException

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise bad_request("send multipart/form-data with a file field 'image' (curl -F image=@file.png)",
                          "invalid_multipart")
    sent = False

    async def replay():  # the body was read already (with its limit); the parser reads it again
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        return await Request(request.scope, replay).form(max_files=1, max_fields=16)
    except (MultiPartException, ValueError, KeyError) as exc:
        raise bad_request(f"malformed multipart body: {exc}", "invalid_multipart") from None
    except StarletteHTTPException as exc:
        raise bad_request(f"malformed multipart body: {exc.detail}", "invalid_multipart") from None


def _form_int(form, name: str, low: int | None) -> int | None:
    value = form.get(name)
    if value is None or value == "":
        return None
    try:
        number = int(str(value))
    except ValueError:
        raise bad_request(f"{name} must be an integer", "invalid_value") from None
    if low is not None and number < low:
        raise bad_request(f"{name} must be at least {low}", "invalid_value")
    return number


def _form_float(form, name: str) -> float | None:
    value = form.get(name)
    if value is None or value == "":
        return None
    try:
        number = float(str(value))
    except ValueError:
        raise bad_request(f"{name} must be a number", "invalid_value") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise bad_request(f"{name} must be a finite number", "invalid_value")
    return number
