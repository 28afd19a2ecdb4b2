"""The built-in demo upstream: an in-process stand-in for an OpenAI-compatible server.

Used when ``SHMSTREAM_UPSTREAM`` is unset, so the service (resume, lookup, Stop) can be tried
with no model anywhere. It answers the completion routes in their usual streaming and
non-streaming shapes with deterministic text (the same request gives the same words) at
``Settings.demo_tokens_per_second``, lists one model whose name says it is a demo, and
answers ``/health``. No network, no threads: the stream sleeps on the caller's event loop
between tokens, and cancelling the task that reads it ends it at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable

from shmstream.relay.client import AsyncUpstream, AsyncUpstreamRequest, AsyncUpstreamResponse
from shmstream.relay.upstream import error_object

DEMO_MODEL = "shmstream-demo"
DEMO_OWNER = "shmstream built-in demo (not a real model)"
DEFAULT_MAX_TOKENS = 64
MAX_TOKENS = 4096

_OPENING_TEXT = ("This is the shmstream demo model, not a real language model. "
                 "It streams deterministic words so you can try resume, lookup and stop.")
_VOCABULARY_TEXT = (
    "shared memory ring buffer stream replay offset worker gunicorn session reader producer "
    "event byte resume cancel token upstream segment futex doorbell conversation chunk "
    "latency signal process thread lookup the a of and to in is it that with"
)
_OPENING = tuple(_OPENING_TEXT.split())
_VOCABULARY = tuple(_VOCABULARY_TEXT.split())

JSON = "application/json; charset=utf-8"
SSE = "text/event-stream"


def demo_words(seed_text: str, count: int) -> list[str]:
    """``count`` words, a pure function of ``seed_text``."""
    seed = hashlib.sha256(seed_text.encode("utf-8", "surrogatepass")).digest()
    words = []
    for index in range(count):
        if index < len(_OPENING):
            words.append(_OPENING[index])
            continue
        digest = hashlib.blake2b(seed + index.to_bytes(4, "little"), digest_size=2).digest()
        words.append(_VOCABULARY[int.from_bytes(digest, "little") % len(_VOCABULARY)])
    return [word if i == 0 else " " + word for i, word in enumerate(words)]


def _prompt_of(body: dict) -> str:
    for key in ("messages", "prompt", "input", "input_extra"):
        if key in body:
            return json.dumps(body[key], sort_keys=True, default=str)
    return ""


def _max_tokens(body: dict) -> int:
    for key in ("max_tokens", "max_completion_tokens", "n_predict", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return min(value, MAX_TOKENS)
    return DEFAULT_MAX_TOKENS


def _sse(data: dict | str, event: str | None = None) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


class _DemoResponse(AsyncUpstreamResponse):
    def __init__(self, status: int, content_type: str, chunks: AsyncIterator[bytes]):
        self.status = status
        self.reason = "OK" if status == 200 else "Error"
        self.headers = [("Content-Type", content_type)]
        self._chunks = chunks

    def aiter_bytes(self) -> AsyncIterator[bytes]:
        return self._chunks

    async def aclose(self) -> None:
        await self._chunks.aclose()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _json_response(status: int, body: dict) -> _DemoResponse:
    return _DemoResponse(status, JSON, _once(json.dumps(body).encode()))


def _error(status: int, message: str) -> _DemoResponse:
    return _json_response(status, {"error": error_object(status, message)})


class AsyncDemoUpstream(AsyncUpstream):
    """Deterministic completions at a fixed token rate, on the caller's event loop, paced
    with ``asyncio.sleep`` (cancelling the task that reads stops the stream at once)."""

    def __init__(self, tokens_per_second: float = 20.0, model: str = DEMO_MODEL):
        self.tokens_per_second = tokens_per_second
        self.model = model
        self.description = (f"built-in demo model '{model}' at {tokens_per_second:g} tokens/s "
                            f"(SHMSTREAM_UPSTREAM is not set; no real model is used)")

    async def open(self, request: AsyncUpstreamRequest) -> AsyncUpstreamResponse:
        path = request.target.split("?", 1)[0]
        method = request.method.upper()
        if path in ("/health", "/v1/health"):
            return _json_response(200, {"status": "ok"})
        if path in ("/v1/models", "/models") and method in ("GET", "HEAD"):
            return _json_response(200, {"object": "list", "data": [{
                "id": self.model, "object": "model", "created": 0, "owned_by": DEMO_OWNER,
                "meta": {"demo": True, "tokens_per_second": self.tokens_per_second},
            }]})
        if path == "/" and method in ("GET", "HEAD"):
            page = (b"<!doctype html><title>shmstream demo</title><p>shmstream is serving its "
                    b"built-in demo model; set SHMSTREAM_UPSTREAM to relay a real server.")
            return _DemoResponse(200, "text/html; charset=utf-8", _once(page))
        formats = self._formats()
        if path in formats:
            if method != "POST":
                return _error(405, f"{method} is not allowed on {path}")
            return await self._complete(request.body, formats[path])
        return _error(404, "File Not Found")

    @staticmethod
    def _formats() -> dict[str, Callable]:
        return {
            "/v1/chat/completions": _ChatFormat,
            "/chat/completions": _ChatFormat,
            "/v1/completions": _TextFormat,
            "/completions": _TextFormat,
            "/completion": _LlamaFormat,
            "/infill": _LlamaFormat,
            "/v1/responses": _ResponsesFormat,
            "/v1/messages": _MessagesFormat,
        }

    async def _complete(self, raw: bytes, format_class) -> AsyncUpstreamResponse:
        try:
            body = json.loads(raw or b"{}")
        except ValueError as exc:
            return _error(400, f"Invalid JSON body: {exc}")
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object")
        words = demo_words(_prompt_of(body), _max_tokens(body))
        seed = hashlib.sha256(raw).hexdigest()[:16]
        fmt = format_class(self.model if "model" not in body else str(body["model"]), seed)
        interval = 1.0 / self.tokens_per_second if self.tokens_per_second > 0 else 0.0
        if body.get("stream") is True:
            return _DemoResponse(200, SSE, self._stream(fmt, words, interval))
        await asyncio.sleep(interval * len(words))
        return _json_response(200, fmt.whole("".join(words), len(words)))

    @staticmethod
    async def _stream(fmt, words: list[str], interval: float) -> AsyncIterator[bytes]:
        start = time.monotonic()
        yield fmt.head()
        for index, word in enumerate(words):
            delay = start + (index + 1) * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            yield fmt.delta(word, index)
        yield fmt.tail(len(words))


class _Format:
    def __init__(self, model: str, seed: str):
        self.model = model
        self.id = seed
        self.created = int(time.time())

    def head(self) -> bytes:
        return b""


class _ChatFormat(_Format):
    def _chunk(self, delta: dict, finish: str | None) -> dict:
        return {"id": f"chatcmpl-demo-{self.id}", "object": "chat.completion.chunk",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def head(self) -> bytes:
        return _sse(self._chunk({"role": "assistant", "content": ""}, None))

    def delta(self, word: str, index: int) -> bytes:
        return _sse(self._chunk({"content": word}, None))

    def tail(self, count: int) -> bytes:
        return _sse(self._chunk({}, "stop")) + _sse("[DONE]")

    def whole(self, text: str, count: int) -> dict:
        return {"id": f"chatcmpl-demo-{self.id}", "object": "chat.completion",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": text}}],
                "usage": {"prompt_tokens": 0, "completion_tokens": count,
                          "total_tokens": count}}


class _TextFormat(_Format):
    def _chunk(self, text: str, finish: str | None) -> dict:
        return {"id": f"cmpl-demo-{self.id}", "object": "text_completion",
                "created": self.created, "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    def delta(self, word: str, index: int) -> bytes:
        return _sse(self._chunk(word, None))

    def tail(self, count: int) -> bytes:
        return _sse(self._chunk("", "stop")) + _sse("[DONE]")

    def whole(self, text: str, count: int) -> dict:
        return {**self._chunk(text, "stop"),
                "usage": {"prompt_tokens": 0, "completion_tokens": count,
                          "total_tokens": count}}


class _LlamaFormat(_Format):
    """llama-server's native ``/completion`` and ``/infill``."""

    def delta(self, word: str, index: int) -> bytes:
        return _sse({"index": 0, "content": word, "tokens": [], "stop": False})

    def tail(self, count: int) -> bytes:
        return _sse(self.whole("", count))

    def whole(self, text: str, count: int) -> dict:
        return {"index": 0, "content": text, "tokens": [], "stop": True, "model": self.model,
                "stop_type": "limit", "tokens_predicted": count}


class _ResponsesFormat(_Format):
    """OpenAI's Responses API events."""

    def _response(self, status: str, text: str | None) -> dict:
        output = [] if text is None else [{
            "type": "message", "id": f"msg-demo-{self.id}", "role": "assistant",
            "status": "completed", "content": [{"type": "output_text", "text": text,
                                                "annotations": []}]}]
        return {"id": f"resp-demo-{self.id}", "object": "response", "created_at": self.created,
                "status": status, "model": self.model, "output": output}

    def head(self) -> bytes:
        self._text = []
        return _sse({"type": "response.created", "response": self._response("in_progress",
                                                                            None)},
                    event="response.created")

    def delta(self, word: str, index: int) -> bytes:
        self._text.append(word)
        return _sse({"type": "response.output_text.delta", "item_id": f"msg-demo-{self.id}",
                     "output_index": 0, "content_index": 0, "delta": word},
                    event="response.output_text.delta")

    def tail(self, count: int) -> bytes:
        text = "".join(self._text)
        return (_sse({"type": "response.output_text.done", "item_id": f"msg-demo-{self.id}",
                      "output_index": 0, "content_index": 0, "text": text},
                     event="response.output_text.done")
                + _sse({"type": "response.completed",
                        "response": self._response("completed", text)},
                       event="response.completed"))

    def whole(self, text: str, count: int) -> dict:
        return self._response("completed", text)


class _MessagesFormat(_Format):
    """Anthropic's Messages API events."""

    def head(self) -> bytes:
        message = {"id": f"msg_demo_{self.id}", "type": "message", "role": "assistant",
                   "content": [], "model": self.model, "stop_reason": None,
                   "usage": {"input_tokens": 0, "output_tokens": 0}}
        return (_sse({"type": "message_start", "message": message}, event="message_start")
                + _sse({"type": "content_block_start", "index": 0,
                        "content_block": {"type": "text", "text": ""}},
                       event="content_block_start"))

    def delta(self, word: str, index: int) -> bytes:
        return _sse({"type": "content_block_delta", "index": 0,
                     "delta": {"type": "text_delta", "text": word}},
                    event="content_block_delta")

    def tail(self, count: int) -> bytes:
        return (_sse({"type": "content_block_stop", "index": 0}, event="content_block_stop")
                + _sse({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": count}}, event="message_delta")
                + _sse({"type": "message_stop"}, event="message_stop"))

    def whole(self, text: str, count: int) -> dict:
        return {"id": f"msg_demo_{self.id}", "type": "message", "role": "assistant",
                "model": self.model, "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 0, "output_tokens": count}}
