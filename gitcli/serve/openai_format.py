"""OpenAI's chat-completions shapes: what a request may ask, what an answer looks like.

The model sees one image and, optionally, one question; a request that asks for more than
that (several images, `n` > 1, tools, earlier turns) is refused with a 400 that says so,
never silently half-answered.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass

from gitcli.serve.errors import bad_request

# accepted and without effect on a one-image model; anything else unknown is ignored too,
# as OpenAI-compatible servers do, except the fields below that ask for what it cannot do
_UNSUPPORTED = {"tools": "tools", "tool_choice": "tools", "functions": "function calling",
                "function_call": "function calling", "logprobs": "logprobs", "audio": "audio output"}


@dataclass
class ChatRequest:
    image_url: str
    question: str | None  # None: caption the image
    max_tokens: int | None
    temperature: float | None
    top_p: float | None
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    ignore_eos: bool = False  # vLLM's extension: decode max_tokens tokens even past EOS


def parse_json(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", "invalid_json") from None
    except RecursionError:
        raise bad_request("the body's JSON is nested too deeply", "invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("the body must be a JSON object", "invalid_json")
    return data


def parse_chat(data: dict) -> ChatRequest:
    for name, what in _UNSUPPORTED.items():
        if data.get(name) not in (None, False, [], {}):
            raise bad_request(f"this model does not support {what} ({name!r})", "unsupported_parameter")
    n = data.get("n", 1)
    if n is not None and n != 1:
        raise bad_request("this model answers one choice per request: n must be 1", "unsupported_parameter")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list", "invalid_messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise bad_request("send exactly one user message (one image, optionally a question); this model keeps "
                          "no conversation, system prompt or earlier turns", "invalid_messages")
    content = messages[0].get("content")
    if isinstance(content, str) or not isinstance(content, list):
        raise bad_request("the user message's content must be a list of parts with one image_url", "missing_image")
    images, texts = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise bad_request("image_url needs a url", "invalid_image_url")
            images.append(url)
        elif kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request("a text part needs a string 'text'", "invalid_messages")
            texts.append(text)
        else:
            raise bad_request(f"unsupported content part {kind!r}: use image_url and text", "invalid_messages")
    if len(images) != 1:
        raise bad_request(f"send exactly one image; this model sees one image per request, not {len(images)}",
                          "unsupported_parameter" if images else "missing_image")
    question = " ".join(t.strip() for t in texts if t.strip()) or None
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    stream_options = data.get("stream_options") or {}
    return ChatRequest(
        image_url=images[0], question=question,
        max_tokens=_int(max_tokens, "max_tokens", 1),
        temperature=_number(data.get("temperature"), "temperature", 0.0, None),
        top_p=_number(data.get("top_p"), "top_p", 0.0, 1.0, open_low=True),
        seed=_int(data.get("seed"), "seed", None),
        stream=bool(data.get("stream", False)),
        include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
        ignore_eos=_bool(data.get("ignore_eos"), "ignore_eos"),
    )


def _bool(value, name: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", "invalid_value")
    return value


def _int(value, name: str, low: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer", "invalid_value")
    if low is not None and value < low:
        raise bad_request(f"{name} must be at least {low}", "invalid_value")
    return value


def _number(value, name: str, low: float, high: float | None, open_low: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad_request(f"{name} must be a number", "invalid_value")
    if value < low or (open_low and value == low) or (high is not None and value > high):
        span = f"({low}, {high}]" if open_low else f">= {low}"
        raise bad_request(f"{name} must be {span}", "invalid_value")
    return float(value)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(cid: str, model: str, text: str, finish_reason: str, usage_: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage_}


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          usage_: dict | None = None, with_choice: bool = True) -> str:
    """One server-sent event of a streamed completion."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
            if with_choice else []}
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


class ContentChunks:
    """One stream's content chunks, each exactly `chunk(cid, model, created, {"content": text})`,
    made from that chunk's JSON split around its text: under load a server sends thousands of
    them a second, and encoding only the text is a fraction of encoding the whole body."""

    def __init__(self, cid: str, model: str, created: int):
        marker = "\x00"
        template = chunk(cid, model, created, {"content": marker})
        # the text is the last string of the body (only nulls follow it), so the last match is it
        self._head, self._tail = template.rsplit(json.dumps(marker), 1)

    def __call__(self, text: str) -> str:
        return f"{self._head}{json.dumps(text, ensure_ascii=False)}{self._tail}"


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


def models_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": "gitcap"}]}


class TextDeltas:
    """Streamed text that adds up to the final text: each delta is what the decoded text
    gained; trailing whitespace and half a UTF-8 character wait for the next token."""

    def __init__(self, decode):
        self._decode = decode  # token ids -> text
        self.sent = ""

    def delta(self, tokens: list[int]) -> str:
        text = self._decode(tokens).strip()
        if text.endswith("\ufffd") or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent):], text
        return new

    def rest(self, final: str) -> str:
        """What is left to send once the final text is known."""
        if final.startswith(self.sent):
            new, self.sent = final[len(self.sent):], final
            return new
        return ""
