"""A FAKE model server for tests, the demo and the bench: it answers like Ollama, it is no model.

It serves the Ollama-native and OpenAI-compatible routes the gateway forwards, the Responses
API and Anthropic's Messages API (in their documented shapes, as vLLM serves them), with output
derived deterministically from the input (a hash picks the words and the vector entries), so a
test can compute the expected reply. Streams (OpenAI SSE, Ollama NDJSON) are sent at a set pace.

Misbehaviour on demand, selected by the request's ``model`` (so it works through the gateway,
sealed or not):

- ``fake-error-<status>``: answer that status (400..599) with an error body in the route's shape
- ``fake-loading-<n>``: answer the first n requests for this model 503 with ``Retry-After: 1``
  (a server still loading its weights), then normally
- ``fake-stall-first``: never send the response headers (until the caller goes away)
- ``fake-stall-mid``: send the first chunk, then go silent
- ``fake-hold``: send the first chunk, then wait for :attr:`FakeModelServer.release`
- ``fake-malformed``: send part of a stream, then cut the connection mid-transfer
- ``fake-gzip``: compress the (non-streamed) reply with ``Content-Encoding: gzip``
- ``fake-headers``: add headers a gateway must not relay (Set-Cookie, payment headers ...)
- ``fake-no-usage``: report no token usage (OpenAI ``usage``, Ollama counts) at all

Token usage is deterministic: prompt tokens are the words of the messages (or prompt),
completion tokens the words sent; the output stops at ``max_tokens``/``max_completion_tokens``
(``options.num_predict``), and a stream carries OpenAI's usage-only last chunk when asked with
``stream_options.include_usage``.

``engine=`` makes the FAKE mirror one engine's documented generation semantics (each engine
profile in ``paygate.upstream.engines`` cites its source) — still a fake, named as such:

- ``"ollama"``: OpenAI routes obey ``max_tokens`` only (``max_completion_tokens``, ``n``,
  ``best_of`` ignored); native routes ``options.num_predict``; 0 and negatives: no limit;
- ``"vllm"``: ``max_completion_tokens or max_tokens``, below 1 refused (400); ``n`` /
  ``best_of`` sequences generated (counted in ``usage``); ``stream_options.
  continuous_usage_stats`` puts usage on every chunk; ``POST /tokenize`` answers ``{"count"}``;
- ``"llama-server"``: ``n_predict`` before ``max_tokens``, -1 no limit, 0 and other negatives
  one token, ``max_completion_tokens`` ignored, ``n`` ≠ 1 refused (500); ``timings_per_token``
  puts ``timings`` (``prompt_n``, ``predicted_n``) on every chunk; ``POST /tokenize`` answers
  ``{"tokens": [...]}`` and ``POST /apply-template`` the prompt;
- ``"any"`` (the default): the smallest non-negative limit named anywhere;
- on every engine, ``/v1/responses`` obeys ``max_output_tokens`` and ``/v1/messages``
  ``max_tokens`` (required), below 1 refused (400), as vLLM serves them.

"No limit" is the request's own ``fake.chunks`` (or the server's ``chunks``) words. A FAKE
token is a word, for ``/tokenize`` too.

A top-level ``"fake": {"pace": seconds, "chunks": n, "pad": bytes}`` in the body overrides the
pace and the length, and pads each word (for backpressure tests). Every request received is
counted per ``METHOD /path`` (unknown paths too): tests read :attr:`FakeModelServer.hits`
directly, other processes ``GET /_fake/stats``.

``POST /api/pull`` streams Ollama-shaped progress and, with a ``models_dir``, writes a manifest
there that ``/api/tags`` then lists (how the container tests see a pull land in the volume).
With an ``api_key`` every route but the stats wants ``Authorization: Bearer KEY`` (401 else),
like a remote OpenAI-compatible service.

Run as a script (``python3 fake_model.py``) it serves on ``OLLAMA_HOST`` with its models in
``OLLAMA_MODELS``, like Ollama: that is how the container tests run it in Ollama's place. So
this module imports nothing but the standard library and aiohttp (Debian's python3-aiohttp).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import sys
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

STATS_PATH = "/_fake/stats"
MODELS = ("fake-llama:latest", "fake-embed:latest")
CREATED_AT = "2024-01-01T00:00:00Z"
_WORDS = (
    "amber", "basil", "cedar", "delta", "ember", "fjord", "grove", "harbor",
    "iris", "juniper", "kelp", "lumen", "meadow", "nectar", "orbit", "pebble",
)  # fmt: skip
_MAX_CHUNKS = 10_000
_MAX_PACE = 60.0
_STALL = 3600.0  # "forever" for a test; the caller's timeout ends it first
_HOLD_LIMIT = 60.0
_MAX_PAD = 1 << 20
_PULL_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}(:[a-z0-9._-]{1,64})?")
_PULL_STEPS = 4  # progress lines per pulled layer
# What "fake-headers" adds: each one must be dropped by the gateway.
HOSTILE_HEADERS = {
    "Set-Cookie": "session=fake",
    "Payment-Response": "fake",
    "X-Payment-Response": "fake",
    "Settlement-Overrides": "fake",
    "X-Paygate-Overhead-Ms": "-1",
    "X-Obol-Reply-Pubkey": "04",
    "ETag": '"fake-etag"',
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ReceivedRequest:
    """What the fake saw of one request (bounded history, for header-hygiene assertions)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


def reply_words(text: str, count: int) -> list[str]:
    """The deterministic words of a reply to ``text``."""
    out: list[str] = []
    block = 0
    while len(out) < count:
        digest = hashlib.sha256(f"{block}:{text}".encode()).digest()
        out.extend(_WORDS[b % len(_WORDS)] for b in digest)
        block += 1
    return out[:count]


def embedding(text: str, dims: int = 8) -> list[float]:
    """A deterministic unit-interval vector for ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 255, 6) for i in range(dims)]


def _prompt(body: dict[str, Any]) -> str:
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content", "")
        return content if isinstance(content, str) else json.dumps(content, sort_keys=True)
    for name in ("prompt", "input"):
        value = body.get(name)
        if isinstance(value, str):
            return value
        if isinstance(value, list):
            return json.dumps(value, sort_keys=True)
    return ""


def prompt_tokens(body: dict[str, Any]) -> int:
    """The fake's token count of a request: the words of every message (or the prompt)."""
    messages = body.get("messages")
    texts: list[str] = []
    if isinstance(messages, list):
        for message in messages:
            content = message.get("content") if isinstance(message, dict) else None
            texts.append(content if isinstance(content, str) else json.dumps(content))
    else:
        texts.append(_prompt(body))
    return sum(len(text.split()) for text in texts)


def output_limit(body: dict[str, Any]) -> int | None:
    """The request's own output limit: max_completion_tokens / max_tokens (OpenAI) or
    options.num_predict (Ollama; negative means none), as a model server honours it."""
    options = body.get("options")
    candidates = [
        body.get("max_completion_tokens"),
        body.get("max_tokens"),
        body.get("max_output_tokens"),  # the Responses API's
    ]
    if isinstance(options, dict):
        candidates.append(options.get("num_predict"))
    limits = [v for v in candidates if isinstance(v, int) and not isinstance(v, bool) and v >= 0]
    return min(limits) if limits else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def engine_limit(engine: str, path: str, body: dict[str, Any]) -> tuple[int | None, int, str]:
    """(output limit or None, sequences generated, refusal message or "") as ``engine`` would
    read ``body`` on ``path`` (see the module docstring)."""
    options = body.get("options") if isinstance(body.get("options"), dict) else {}
    if path in ("/v1/responses", "/v1/messages"):
        # One key each (vLLM's ResponsesRequest, its Anthropic request), one sequence.
        key = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
        value = _int(body.get(key))
        if value is not None and value < 1:
            return None, 1, f"{key} must be at least 1"
        return value, 1, ""
    if engine == "ollama":
        value = _int(options.get("num_predict")) if path.startswith("/api/") else None
        if not path.startswith("/api/"):
            value = _int(body.get("max_tokens"))
        return (value if value is not None and value > 0 else None), 1, ""
    if engine == "vllm":
        value = _int(body.get("max_completion_tokens")) or _int(body.get("max_tokens"))
        if value is not None and value < 1:
            return None, 1, "max_tokens must be at least 1"
        choices = max(_int(body.get("n")) or 1, _int(body.get("best_of")) or 1)
        return value, choices, ""
    if engine == "llama-server":
        if (_int(body.get("n")) or 1) != 1:
            return None, 1, "Only one completion choice is allowed"
        value = _int(body.get("n_predict"))
        if value is None:
            value = _int(body.get("max_tokens"))
        if value is None or value == -1:
            return None, 1, ""
        return max(value, 1), 1, ""
    return output_limit(body), 1, ""


class FakeModelServer:
    """The fake. Build it, then serve :attr:`app` (TestServer, AppRunner or :func:`run`)."""

    def __init__(
        self,
        *,
        pace: float = 0.0,
        chunks: int = 4,
        models_dir: Path | None = None,
        api_key: str | None = None,
        engine: str = "any",
    ) -> None:
        self.engine = engine
        self.pace = pace
        self.chunks = chunks
        self.models_dir = models_dir
        self.api_key = api_key
        self.hits: Counter[str] = Counter()
        self.cancelled: Counter[str] = Counter()
        self.completed: Counter[str] = Counter()
        self.received: deque[ReceivedRequest] = deque(maxlen=64)
        self.release = asyncio.Event()
        self.loading: Counter[str] = Counter()  # 503s sent per fake-loading-<n> model
        self.app = self._build()

    def reset(self) -> None:
        """Forget every count and received request (the pace and length stay)."""
        self.hits.clear()
        self.cancelled.clear()
        self.completed.clear()
        self.received.clear()
        self.loading.clear()
        self.release.clear()

    def stats(self) -> dict[str, dict[str, int]]:
        return {
            "hits": dict(self.hits),
            "cancelled": dict(self.cancelled),
            "completed": dict(self.completed),
        }

    def _build(self) -> web.Application:
        app = web.Application(middlewares=[self._count], client_max_size=64 * 1024 * 1024)
        r = app.router
        r.add_get("/", self._root)
        r.add_get(STATS_PATH, self._stats)
        r.add_post("/api/chat", self._ollama_chat)
        r.add_post("/api/generate", self._ollama_generate)
        r.add_post("/api/embed", self._ollama_embed)
        r.add_post("/api/embeddings", self._ollama_embeddings)
        r.add_post("/api/show", self._ollama_show)
        r.add_get("/api/tags", self._ollama_tags)
        r.add_get("/api/version", self._ollama_version)
        r.add_post("/api/pull", self._ollama_pull)
        for path in ("/api/push", "/api/create", "/api/copy", "/api/ps"):
            r.add_route("*", path, self._ollama_admin)
        r.add_route("DELETE", "/api/delete", self._ollama_admin)
        r.add_post("/v1/chat/completions", self._openai_chat)
        r.add_post("/v1/completions", self._openai_completions)
        r.add_post("/v1/embeddings", self._openai_embeddings)
        r.add_post("/v1/responses", self._responses)
        r.add_post("/v1/messages", self._messages)
        r.add_get("/v1/models", self._openai_models)
        r.add_post("/tokenize", self._tokenize)
        r.add_post("/apply-template", self._apply_template)
        r.add_get("/v1/models/{model}", self._openai_model)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != STATS_PATH:
            key = f"{request.method} {request.path}"
            self.hits[key] += 1
            body = await request.read()
            self.received.append(
                ReceivedRequest(
                    request.method, request.path, request.query_string, dict(request.headers), body
                )
            )
        try:
            if self.api_key is not None and request.path != STATS_PATH:
                self._authorize(request)
            return await handler(request)
        except _Answer as answer:
            return answer.response

    # --- helpers -----------------------------------------------------------------------------

    def _authorize(self, request: web.Request) -> None:
        if request.headers.get("Authorization", "") != f"Bearer {self.api_key}":
            raise _error(request, 401, "invalid API key")

    def _pulled(self) -> list[str]:
        if self.models_dir is None:
            return []
        library = self.models_dir / "manifests" / "registry.ollama.ai" / "library"
        if not library.is_dir():
            return []
        return sorted(f"{tag.parent.name}:{tag.name}" for tag in library.glob("*/*"))

    async def _json(self, request: web.Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.read() or b"{}")
        except (ValueError, UnicodeDecodeError):
            raise _error(request, 400, "invalid JSON body") from None
        if not isinstance(body, dict):
            raise _error(request, 400, "the body must be a JSON object")
        return body

    def _limit(self, request: web.Request, body: dict[str, Any]) -> tuple[int | None, int]:
        """The output limit and sequences this FAKE's engine would obey, or its refusal."""
        limit, choices, refused = engine_limit(self.engine, request.path, body)
        if refused:
            raise _error(request, 500 if self.engine == "llama-server" else 400, refused)
        return limit, choices

    def _shape(self, body: dict[str, Any], limit: int | None = None) -> tuple[float, int, int]:
        options = body.get("fake")
        pace, chunks, pad = self.pace, self.chunks, 0
        if isinstance(options, dict):
            if isinstance(options.get("pace"), int | float):
                pace = min(max(float(options["pace"]), 0.0), _MAX_PACE)
            if isinstance(options.get("chunks"), int):
                chunks = min(max(options["chunks"], 1), _MAX_CHUNKS)
            if isinstance(options.get("pad"), int):
                pad = min(max(options["pad"], 0), _MAX_PAD)
        if limit is not None:
            chunks = min(chunks, limit)  # like a model server: stop at the output limit
        return pace, chunks, pad

    async def _misbehave_first(self, request: web.Request, model: str) -> None:
        if model.startswith("fake-error-"):
            code = model.removeprefix("fake-error-")
            status = int(code) if code.isdigit() else 500
            raise _error(request, min(max(status, 400), 599), f"injected error {status}")
        if model.startswith("fake-loading-"):
            count = model.removeprefix("fake-loading-")
            if count.isdigit() and self.loading[model] < int(count):
                self.loading[model] += 1
                answer = _error(request, 503, "loading model")
                answer.response.headers["Retry-After"] = "1"
                raise answer
        if model == "fake-stall-first":
            await self._tracked(request, asyncio.sleep(_STALL))

    async def _tracked(self, request: web.Request, work: Awaitable[Any]) -> Any:
        try:
            return await work
        except (asyncio.CancelledError, ConnectionResetError):
            # The caller (the gateway) went away: the proof of disconnect propagation.
            self.cancelled[f"{request.method} {request.path}"] += 1
            raise

    async def _stream(
        self,
        request: web.Request,
        model: str,
        pace: float,
        lines: Iterator[bytes],
        content_type: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        await response.prepare(request)

        async def pump() -> None:
            for index, line in enumerate(lines):
                if index > 0 and pace:
                    await asyncio.sleep(pace)
                await response.write(line)
                if index == 0 and await self._after_first(request, model):
                    return
            await response.write_eof()

        await self._tracked(request, pump())
        self.completed[f"{request.method} {request.path}"] += 1
        return response

    async def _after_first(self, request: web.Request, model: str) -> bool:
        """Misbehaviour after the first chunk; True means the stream was cut."""
        if model == "fake-stall-mid":
            await asyncio.sleep(_STALL)
        elif model == "fake-hold":
            async with asyncio.timeout(_HOLD_LIMIT):
                await self.release.wait()
        elif model == "fake-malformed" and request.transport is not None:
            # Cut the chunked transfer before its terminator: a broken upstream stream.
            request.transport.close()
            return True
        return False

    async def _reply(self, request: web.Request, model: str, payload: Any) -> web.Response:
        self.completed[f"{request.method} {request.path}"] += 1
        data = json.dumps(payload).encode()
        if model == "fake-headers":
            return web.Response(body=data, content_type="application/json", headers=HOSTILE_HEADERS)
        if model == "fake-gzip":
            return web.Response(
                body=gzip.compress(data),
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        return web.Response(body=data, content_type="application/json")

    # --- Ollama --------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Fake model server is running (a test fake, not Ollama)")

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def _ollama_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama_text(request, chat=True)

    async def _ollama_generate(self, request: web.Request) -> web.StreamResponse:
        return await self._ollama_text(request, chat=False)

    async def _ollama_text(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        limit, _ = self._limit(request, body)
        pace, count, pad = self._shape(body, limit)
        words = [word + "." * pad for word in reply_words(_prompt(body), count)]

        def part(text: str, done: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": CREATED_AT}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out["done"] = done
            if done:
                out["done_reason"] = "length" if limit == count else "stop"
                if model != "fake-no-usage":
                    out.update(prompt_eval_count=prompt_tokens(body), eval_count=count)
            return out

        if body.get("stream", True) is not False:  # Ollama streams unless told not to

            def lines() -> Iterator[bytes]:
                for word in words:
                    yield json.dumps(part(" " + word, False)).encode() + b"\n"
                yield json.dumps(part("", True)).encode() + b"\n"

            return await self._stream(request, model, pace, lines(), "application/x-ndjson")
        return await self._reply(request, model, part(" " + " ".join(words), True))

    async def _ollama_embed(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        inputs = body.get("input", "")
        texts = inputs if isinstance(inputs, list) else [inputs]
        vectors = [embedding(str(text)) for text in texts]
        return await self._reply(request, model, {"model": model, "embeddings": vectors})

    async def _ollama_embeddings(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        return await self._reply(
            request, model, {"embedding": embedding(str(body.get("prompt", "")))}
        )

    async def _ollama_show(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        return await self._reply(
            request,
            model,
            {
                "modelfile": f"# fake modelfile for {model}",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": {"family": "fake", "parameter_size": "0B", "format": "fake"},
                "model_info": {},
            },
        )

    async def _ollama_tags(self, request: web.Request) -> web.Response:
        models = [
            {
                "name": name,
                "model": name,
                "modified_at": CREATED_AT,
                "size": 1,
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {"family": "fake"},
            }
            for name in (*MODELS, *self._pulled())
        ]
        return await self._reply(request, "", {"models": models})

    async def _ollama_version(self, request: web.Request) -> web.Response:
        return await self._reply(request, "", {"version": "0.0.0-fake"})

    async def _ollama_pull(self, request: web.Request) -> web.StreamResponse:
        body = await self._json(request)
        name = str(body.get("model") or body.get("name") or "")
        if not _PULL_NAME.fullmatch(name):
            raise _error(request, 400, "invalid model name")
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        total = 4096

        def write_manifest() -> None:
            if self.models_dir is not None:
                install_model(self.models_dir, name)

        if body.get("stream", True) is False:
            write_manifest()
            return web.json_response({"status": "success"})

        def lines() -> Iterator[bytes]:
            yield json.dumps({"status": "pulling manifest"}).encode() + b"\n"
            for step in range(1, _PULL_STEPS + 1):
                progress = {"digest": digest, "total": total, "completed": total * step // 4}
                yield json.dumps({"status": f"pulling {digest[7:19]}", **progress}).encode() + b"\n"
            yield json.dumps({"status": "verifying sha256 digest"}).encode() + b"\n"
            write_manifest()
            yield json.dumps({"status": "writing manifest"}).encode() + b"\n"
            yield json.dumps({"status": "success"}).encode() + b"\n"

        return await self._stream(request, name, self.pace, lines(), "application/x-ndjson")

    async def _ollama_admin(self, request: web.Request) -> web.Response:
        # Counted by the middleware: a test asserts these are never reached through the gateway.
        return web.json_response({"status": "success"})

    # --- OpenAI --------------------------------------------------------------------------------

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_text(request, chat=True)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai_text(request, chat=False)

    async def _openai_text(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        limit, choices = self._limit(request, body)
        pace, count, pad = self._shape(body, limit)
        prompt = _prompt(body)
        words = [word + "." * pad for word in reply_words(prompt, count)]
        ident = "fake-" + hashlib.sha256(prompt.encode()).hexdigest()[:12]
        read = prompt_tokens(body)
        made = count * choices  # every sequence generated counts, returned or not
        usage = {"prompt_tokens": read, "completion_tokens": made, "total_tokens": read + made}
        reports = model != "fake-no-usage"
        options = body.get("stream_options")
        stream_usage = (
            reports and isinstance(options, dict) and options.get("include_usage") is True
        )
        running = reports and (
            (self.engine == "vllm" and isinstance(options, dict)
             and options.get("continuous_usage_stats") is True)
            or (self.engine == "llama-server" and body.get("timings_per_token") is True)
        )  # fmt: skip
        finish_reason = "length" if limit == count else "stop"
        if body.get("stream") is True:
            kind = "chat.completion.chunk" if chat else "text_completion"

            def event(text: str | None, finish: str | None, sent: int) -> bytes:
                if chat:
                    delta = {"content": text} if text is not None else {}
                    choice: dict[str, Any] = {"index": 0, "delta": delta}
                else:
                    choice = {"index": 0, "text": text or ""}
                choice["finish_reason"] = finish
                chunk = {"id": ident, "object": kind, "created": 0, "model": model}
                chunk["choices"] = [choice]
                if running and self.engine == "vllm":
                    done = sent * choices
                    chunk["usage"] = {"prompt_tokens": read, "completion_tokens": done,
                                      "total_tokens": read + done}  # fmt: skip
                elif running:
                    chunk["timings"] = {"prompt_n": read, "predicted_n": sent}
                return b"data: " + json.dumps(chunk).encode() + b"\n\n"

            def lines() -> Iterator[bytes]:
                for index, word in enumerate(words):
                    yield event(" " + word, None, index + 1)
                yield event(None, finish_reason, count)
                if stream_usage:  # OpenAI's shape: one more chunk, no choices, the usage
                    chunk = {"id": ident, "object": kind, "created": 0, "model": model}
                    chunk.update(choices=[], usage=usage)
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return await self._stream(request, model, pace, lines(), "text/event-stream")
        text = " " + " ".join(words)
        returned = []
        for index in range(min(choices, _int(body.get("n")) or 1)):
            if chat:
                choice = {"index": index, "message": {"role": "assistant", "content": text}}
            else:
                choice = {"index": index, "text": text}
            choice["finish_reason"] = finish_reason
            returned.append(choice)
        payload = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": 0,
            "model": model,
            "choices": returned,
        }
        if reports:
            payload["usage"] = usage
        return await self._reply(request, model, payload)

    # --- the Responses API and Anthropic's Messages API, in the documented shapes (vLLM serves
    # both; the llama-server built for the tests serves neither) ---------------------------------

    def _generated(
        self, request: web.Request, body: dict[str, Any]
    ) -> tuple[float, list[str], int, str]:
        limit, _ = self._limit(request, body)
        pace, count, pad = self._shape(body, limit)
        prompt = _prompt(body)
        words = [word + "." * pad for word in reply_words(prompt, count)]
        return pace, words, prompt_tokens(body), hashlib.sha256(prompt.encode()).hexdigest()[:12]

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/responses``: a response object, or its SSE events ending with
        ``response.completed`` (which carries the usage); no ``[DONE]``."""
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        pace, words, read, ident = self._generated(request, body)
        usage = {
            "input_tokens": read,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": len(words),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": read + len(words),
        }
        text = " " + " ".join(words)

        def response(status: str, done: bool) -> dict[str, Any]:
            content = [{"type": "output_text", "text": text if done else "", "annotations": []}]
            item = {"type": "message", "id": "msg_" + ident, "role": "assistant",
                    "status": status, "content": content if done else []}  # fmt: skip
            return {
                "id": "resp_" + ident, "object": "response", "created_at": 0, "model": model,
                "status": status, "output": [item] if done else [], "error": None,
                "incomplete_details": None, "instructions": None, "metadata": None,
                "parallel_tool_calls": True, "temperature": None, "tool_choice": "auto",
                "tools": [], "top_p": None, "store": body.get("store", True),
                "usage": usage if done and model != "fake-no-usage" else None,
            }  # fmt: skip

        if body.get("stream") is not True:
            return await self._reply(request, model, response("completed", True))

        def lines() -> Iterator[bytes]:
            sequence = 0

            def event(kind: str, data: dict[str, Any]) -> bytes:
                nonlocal sequence
                payload = {"type": kind, "sequence_number": sequence, **data}
                sequence += 1
                return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()

            yield event("response.created", {"response": response("in_progress", False)})
            for word in words:
                delta = {"item_id": "msg_" + ident, "output_index": 0, "content_index": 0,
                         "delta": " " + word, "logprobs": []}  # fmt: skip
                yield event("response.output_text.delta", delta)
            yield event("response.completed", {"response": response("completed", True)})

        return await self._stream(request, model, pace, lines(), "text/event-stream")

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/messages`` (Anthropic): a message, or its named SSE events (the input
        count on ``message_start``, the output count on ``message_delta``)."""
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        if not isinstance(body.get("max_tokens"), int):
            raise _error(request, 400, "max_tokens: Field required")
        pace, words, read, ident = self._generated(request, body)
        stop = "max_tokens" if body["max_tokens"] == len(words) else "end_turn"
        reports = model != "fake-no-usage"
        message: dict[str, Any] = {
            "id": "msg_" + ident, "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": " " + " ".join(words)}],
            "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": read, "output_tokens": len(words)},
        }  # fmt: skip
        if not reports:
            message["usage"] = {}
        if body.get("stream") is not True:
            return await self._reply(request, model, message)

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()

        def lines() -> Iterator[bytes]:
            start = {**message, "content": [], "stop_reason": None}
            start["usage"] = {"input_tokens": read, "output_tokens": 1} if reports else {}
            yield event("message_start", {"message": start})
            block = {"type": "text", "text": ""}
            yield event("content_block_start", {"index": 0, "content_block": block})
            for word in words:
                delta = {"type": "text_delta", "text": " " + word}
                yield event("content_block_delta", {"index": 0, "delta": delta})
            yield event("content_block_stop", {"index": 0})
            end = {"delta": {"stop_reason": stop, "stop_sequence": None}}
            end["usage"] = {"output_tokens": len(words)} if reports else {}
            yield event("message_delta", end)
            yield event("message_stop", {})

        return await self._stream(request, model, pace, lines(), "text/event-stream")

    async def _tokenize(self, request: web.Request) -> web.Response:
        """``POST /tokenize``: a FAKE token is a word (vLLM's and llama-server's shapes)."""
        body = await self._json(request)
        text = body.get("content", body.get("prompt"))
        if isinstance(body.get("messages"), list):
            text = " ".join(
                str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict)
            )
        if not isinstance(text, str) or self.engine not in ("vllm", "llama-server"):
            raise _error(request, 404, "no tokenizer here")
        count = len(text.split())
        if self.engine == "vllm":
            return web.json_response({"count": count, "max_model_len": 4096, "tokens": []})
        return web.json_response({"tokens": list(range(count))})

    async def _apply_template(self, request: web.Request) -> web.Response:
        """llama-server's ``POST /apply-template``: the FAKE template is the contents joined."""
        body = await self._json(request)
        messages = body.get("messages") if isinstance(body.get("messages"), list) else []
        if self.engine != "llama-server":
            raise _error(request, 404, "no template here")
        prompt = " ".join(str(m.get("content", "")) for m in messages if isinstance(m, dict))
        return web.json_response({"prompt": prompt})

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        model = str(body.get("model", ""))
        await self._misbehave_first(request, model)
        inputs = body.get("input", "")
        texts = inputs if isinstance(inputs, list) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": embedding(str(text))}
            for i, text in enumerate(texts)
        ]
        return await self._reply(
            request,
            model,
            {"object": "list", "data": data, "model": model, "usage": {"prompt_tokens": 1}},
        )

    async def _openai_models(self, request: web.Request) -> web.Response:
        data = [_model_card(name) for name in MODELS]
        return await self._reply(request, "", {"object": "list", "data": data})

    async def _openai_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in MODELS:
            raise _error(request, 404, f"model {name!r} not found")
        return await self._reply(request, "", _model_card(name))


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fake"}


class _Answer(Exception):
    """Raised to answer at once with ``response`` (errors on demand, bad input)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


def _error(request: web.Request, status: int, message: str) -> _Answer:
    if request.path.startswith("/v1/"):
        body: dict[str, Any] = {
            "error": {"message": message, "type": "invalid_request_error", "code": None}
        }
    else:
        body = {"error": message}
    return _Answer(web.json_response(body, status=status))


def run(host: str, port: int, *, pace: float = 0.0, chunks: int = 4) -> None:
    """Serve a fake on ``host:port`` until interrupted (``paygate fake-upstream``)."""
    fake = FakeModelServer(pace=pace, chunks=chunks)
    web.run_app(fake.app, host=host, port=port, handler_cancellation=True, print=None)


def main() -> int:
    """Serve like Ollama does: ``OLLAMA_HOST`` (host:port) and ``OLLAMA_MODELS``."""
    host, _, port = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").rpartition(":")
    models = Path(os.environ.get("OLLAMA_MODELS", str(Path.home() / ".ollama" / "models")))
    fake = FakeModelServer(models_dir=models)
    # aiohttp 3.8 (Debian 12) cancels handlers on disconnect by itself and lacks the option.
    options = {"handler_cancellation": True} if hasattr(web, "AppKey") else {}
    print(f"FAKE model server (not Ollama) on {host or '127.0.0.1'}:{port}", file=sys.stderr)
    web.run_app(fake.app, host=host or "127.0.0.1", port=int(port), print=None, **options)
    return 0


def _blob_contents(name: str) -> dict[str, str]:
    """The FAKE blobs of a model: config, the "weights" (``name`` itself, so the model layer's
    digest is sha256 of ``name``, as the pull progress reports it) and a template."""
    return {
        "docker.container.image.v1+json": f"config {name}",
        "ollama.image.model": name,
        "ollama.image.template": f"t {name}",
    }


def manifest_document(name: str) -> dict[str, Any]:
    """An Ollama-shaped manifest: config, the model layer and a template layer, which real
    manifests also carry."""

    def blob(kind: str, data: str) -> dict[str, Any]:
        return {
            "mediaType": f"application/vnd.{kind}",
            "digest": "sha256:" + hashlib.sha256(data.encode()).hexdigest(),
            "size": len(data),
        }

    contents = _blob_contents(name)
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": blob(
            "docker.container.image.v1+json", contents["docker.container.image.v1+json"]
        ),
        "layers": [
            blob("ollama.image.model", contents["ollama.image.model"]),
            blob("ollama.image.template", contents["ollama.image.template"]),
        ],
    }


def install_model(models_dir: Path, name: str) -> None:
    """A pulled model as Ollama lays it out: ``manifests/…/name/tag`` and ``blobs/sha256-…``."""
    model, _, tag = name.partition(":")
    target = models_dir / "manifests" / "registry.ollama.ai" / "library" / model
    target.mkdir(parents=True, exist_ok=True)
    blobs = models_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in _blob_contents(name).values():
        (blobs / ("sha256-" + hashlib.sha256(data.encode()).hexdigest())).write_text(data)
    (target / (tag or "latest")).write_text(json.dumps(manifest_document(name)))


if __name__ == "__main__":
    sys.exit(main())
