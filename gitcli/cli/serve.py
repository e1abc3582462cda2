"""`gitcap serve`: the model loaded once behind an OpenAI-compatible HTTP API and a page."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from gitcli.cli.common import (BeamsOpt, CacheOpt, CheckpointOpt, DecodeCompileOpt, DeviceOpt, DtypeOpt, PrecisionOpt,
                               PresetOpt, QuantOverrideOpt, TemperatureOpt, TopPOpt, user_errors)


@user_errors
def serve(
    checkpoint: CheckpointOpt = None,
    preset: PresetOpt = None,
    beams: BeamsOpt = 1,
    max_new_tokens: Annotated[Optional[int], typer.Option(
        "--max-new-tokens", min=1, help="Default longest answer in tokens (default: 20 for captions, 10 for "
                                        "answers, as caption and ask).")] = None,
    temperature: TemperatureOpt = 0.0,
    top_p: TopPOpt = 1.0,
    seed: Annotated[Optional[int], typer.Option(
        "--seed", help="Sampling seed of requests that give none (default: a fresh one per request).")] = None,
    cache: CacheOpt = "dynamic",
    compile: DecodeCompileOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quant: QuantOverrideOpt = None,
    precision: PrecisionOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Rows decoded together.")] = 64,
    prefill_batch: Annotated[int, typer.Option(
        "--prefill-batch", min=1, help="Newcomers prefilled together when their prompts have one length (1: each "
                                       "alone, as caption does one image; more: higher throughput under load).")] = 16,
    max_waiting_steps: Annotated[int, typer.Option(
        "--max-waiting-steps", min=0, help="Decoding steps a request arriving at a busy server may wait for others "
                                           "to prefill with (0: it joins at the next step).")] = 1,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=1, help="Requests waiting for a row; beyond it a request gets 503 with Retry-After.")] = 256,
    max_image_bytes: Annotated[int, typer.Option(
        "--max-image-bytes", min=1, help="Largest image upload (413 above it).")] = 20_000_000,
    max_image_pixels: Annotated[int, typer.Option(
        "--max-image-pixels", min=1, help="Largest decoded image, width x height (400 above it).")] = 40_000_000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="GITCAP_API_KEY", show_envvar=True,
        help="Require 'Authorization: Bearer KEY' on every /v1/ route.")] = None,
    allow_image_urls: Annotated[bool, typer.Option(
        "--allow-image-urls", help="Fetch http(s) image URLs (public addresses only, as gitcap fetch).")] = False,
    scheduler: Annotated[str, typer.Option(
        "--scheduler", help="continuous: requests join the running batch at the next token; whole: a batch runs "
                            "to completion before the next starts (the baseline).")] = "continuous",
) -> None:
    """Serve a captioner over HTTP: OpenAI chat completions, /v1/caption, /v1/ask, a web page at /.

    Requests are batched continuously; the decoding options are the defaults a request can
    override. Beam-search requests are decoded in groups between the batch's steps, and only
    they use --cache static / --compile. SIGTERM drains: new requests get 503, running ones
    finish, then it exits.

    Example: gitcap serve --checkpoint ./gitcap-demo --port 8000
    """
    from gitcli.cli.common import console
    from gitcli.config import GenerationConfig
    from gitcli.serve.config import ServeConfig, exposure_warning
    from gitcli.serve.server import bind

    config = ServeConfig(
        generation=GenerationConfig(beams=beams, temperature=temperature, top_p=top_p, cache=cache, compile=compile),
        seed=seed,
        max_new_tokens=max_new_tokens, host=host, port=port, max_batch_size=max_batch_size,
        prefill_batch=prefill_batch, max_waiting_steps=max_waiting_steps, max_queue=max_queue,
        max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels, api_key=api_key,
        allow_image_urls=allow_image_urls, scheduler=scheduler)
    config.validate()
    if checkpoint is None and preset is None:
        from gitcli.errors import GitcapError

        raise GitcapError("no model: pass --checkpoint DIR (or --preset tiny for an untrained tiny model)")
    warning = exposure_warning(host, api_key)
    if warning:
        console.print(f"[yellow]warning:[/] {warning}")
    sock = bind(host, port)  # a taken port is reported before the model loads
    try:
        _load_and_serve(sock, config, checkpoint=checkpoint, preset=preset, device=device, dtype=dtype,
                        quant=quant, precision=precision)
    finally:
        sock.close()


def _load_and_serve(sock, config, *, checkpoint, preset, device, dtype, quant, precision) -> None:
    """Listen at once (/health says "loading"), load the model in a thread, then serve."""
    from pathlib import Path

    from gitcli.cli.common import console
    from gitcli.errors import GitcapError
    from gitcli.infer import RuntimeOptions, load_model
    from gitcli.serve.app import create_app
    from gitcli.serve.server import freeze_loaded_objects, serve

    # a wrong path or preset is one line before the server starts (a model that fails to
    # load later is one error line after the "serving" line)
    if checkpoint is not None and preset is not None:
        raise GitcapError("give either --checkpoint or --preset, not both")
    if checkpoint is not None:
        from gitcli.model.checkpoint import resolve_checkpoint

        resolve_checkpoint(checkpoint)
    elif preset != "tiny":
        raise GitcapError(f"unknown preset {preset!r}; the built-in preset is: tiny")
    runtime = RuntimeOptions(device=device, dtype=None if dtype == "auto" else dtype, quant=quant,
                             precision=precision)
    config.model_id = f"gitcap-{preset}" if preset is not None else Path(checkpoint).resolve().name
    port = sock.getsockname()[1]
    shown = f"[{config.host}]" if ":" in config.host else config.host
    url = f"http://{shown}:{port}"
    failures: list[BaseException] = []

    def load():
        model, dev, prec = load_model(checkpoint, preset, runtime)
        config.precision = prec  # read when the engine is built, right after
        freeze_loaded_objects()
        return model, dev

    def ready() -> None:
        if preset is not None:
            console.print(f"[yellow]note:[/] the {preset} preset is untrained here: expect random words")
        console.print(f"ready: [bold]{config.model_id}[/] at {url}  (API docs: {url}/docs; Ctrl-C or SIGTERM "
                      "drains and stops)")

    def load_failed(exc: BaseException) -> None:
        failures.append(exc)
        app.state.server.should_exit = True

    app = create_app(None, config, load=load, on_ready=ready, on_load_error=load_failed)
    console.print(f"serving at {url}: loading {config.model_id} (GET /health says ready when it is)")
    serve(app, sock)
    if failures:
        raise failures[0]
