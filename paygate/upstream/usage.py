"""Token usage read from model server replies: sans-IO, fed the body's bytes as they pass.

Shapes (engine profiles say which routes speak which):

- OpenAI, whole: ``{"usage": {"prompt_tokens", "completion_tokens", "total_tokens"}}``;
- OpenAI, SSE: the chunk that carries a non-null ``usage`` (the last before ``data: [DONE]``,
  sent only when the caller asked with ``stream_options.include_usage``);
- Ollama, whole or NDJSON: ``prompt_eval_count`` and ``eval_count`` in the final object
  (``"done": true``);
- OpenAI Responses: ``usage`` ``{input_tokens, output_tokens}`` on the response object, in a
  stream on the ``response.completed`` event's ``response``;
- Anthropic Messages: ``usage`` ``{input_tokens, output_tokens}`` (prompt tokens also count
  ``cache_read_input_tokens`` and ``cache_creation_input_tokens``, as Anthropic defines them);
  in a stream the input on ``message_start``'s ``message`` and the running output count on each
  ``message_delta``: the reader keeps the last value stated of each.

While a stream passes, the reader also keeps the *running* counts — the last ``usage`` any
chunk carried (vLLM's ``continuous_usage_stats``), or llama-server's per-token ``timings``
(``prompt_n``, ``predicted_n``) — and the completion text delivered so far (bounded), so that a
stream that ends early can be charged for what was produced.

:class:`UsageReader` takes chunks in any split, holds at most ``limit`` bytes (a whole JSON
reply, or one stream line), never raises on bad input, and answers None when the reply says
nothing about usage. Metering prices what it returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from paygate import jsonsafe, wire

DEFAULT_LIMIT = 1 << 20  # bytes of one JSON reply or stream line read for usage
TEXT_LIMIT = 1 << 20  # characters of completion text kept for counting an early end


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens the model server says it read and wrote for one request."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _input_output(usage: dict[str, Any]) -> tuple[int | None, int | None]:
    """Responses' and Anthropic's counts (Anthropic's cached input is input too)."""
    prompt = _count(usage.get("input_tokens"))
    if prompt is not None:
        for extra in ("cache_read_input_tokens", "cache_creation_input_tokens"):
            prompt += _count(usage.get(extra)) or 0
    return prompt, _count(usage.get("output_tokens"))


def stated_counts(document: Any) -> tuple[int | None, int | None] | None:
    """``(prompt, completion)`` as far as one reply object or stream event states them (either
    may be None: an Anthropic ``message_delta`` carries the output count alone), or None."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        # A Responses stream's response.completed, an Anthropic stream's message_start.
        nested = document.get("response", document.get("message"))
        usage = nested.get("usage") if isinstance(nested, dict) else None
    if isinstance(usage, dict) and "prompt_tokens" not in usage:
        prompt, completion = _input_output(usage)
        if prompt is not None or completion is not None:
            return prompt, completion
    found = usage_of(document)
    return (found.prompt_tokens, found.completion_tokens) if found is not None else None


def usage_of(document: Any) -> Usage | None:
    """The usage one parsed reply object (a whole reply or one stream event) states, if any."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if isinstance(usage, dict) and "prompt_tokens" not in usage:
        prompt, completion = _input_output(usage)
        if prompt is not None:
            return Usage(prompt, completion or 0)
    if isinstance(usage, dict):
        prompt, completion = (
            _count(usage.get("prompt_tokens")),
            _count(usage.get("completion_tokens")),
        )
        if prompt is not None:
            # Embeddings report prompt tokens only.
            return Usage(prompt, completion or 0)
    prompt, completion = (
        _count(document.get("prompt_eval_count")),
        _count(document.get("eval_count")),
    )
    if prompt is not None or completion is not None:
        return Usage(prompt or 0, completion or 0)
    return None


def running_of(document: Any) -> Usage | None:
    """The counts one stream event states so far: its usage, else llama-server's timings."""
    found = usage_of(document)
    if found is not None or not isinstance(document, dict):
        return found
    timings = document.get("timings")
    if isinstance(timings, dict):
        prompt, predicted = _count(timings.get("prompt_n")), _count(timings.get("predicted_n"))
        if predicted is not None:
            return Usage(prompt or 0, predicted)
    return None


def text_of(document: Any) -> str:
    """The completion text one stream event carries (OpenAI chunks, Ollama objects, the
    Responses API's and Anthropic's text deltas)."""
    if not isinstance(document, dict):
        return ""
    pieces: list[str] = []
    choices = document.get("choices")
    for choice in choices if isinstance(choices, list) else []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta") or choice.get("message")
        if isinstance(delta, dict) and isinstance(delta.get("content"), str):
            pieces.append(delta["content"])
        elif isinstance(choice.get("text"), str):
            pieces.append(choice["text"])
    message = document.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        pieces.append(message["content"])
    if isinstance(document.get("response"), str):
        pieces.append(document["response"])
    delta = document.get("delta")
    if document.get("type") == "response.output_text.delta" and isinstance(delta, str):
        pieces.append(delta)  # the Responses API's text, in a stream
    elif isinstance(delta, dict) and isinstance(delta.get("text"), str):
        pieces.append(delta["text"])  # Anthropic's content_block_delta (text_delta)
    return "".join(pieces)


def _merged(before: Usage | None, counts: tuple[int | None, int | None]) -> Usage:
    """``before`` with the counts an event states (a None keeps the count stated before)."""
    prompt, completion = counts
    if prompt is None:
        prompt = before.prompt_tokens if before is not None else 0
    if completion is None:
        completion = before.completion_tokens if before is not None else 0
    return Usage(prompt, completion)


def _parsed(line: bytes) -> Any:
    try:
        return jsonsafe.loads(line, max_bytes=len(line), max_depth=None)
    except jsonsafe.UntrustedJSONError:
        return None


def usage_from_body(body: bytes) -> Usage | None:
    """The usage a whole (non-streamed) JSON reply states."""
    try:
        # The model server is not trusted either; the reader already bounded the size.
        return usage_of(jsonsafe.loads(body, max_bytes=len(body), max_depth=None))
    except jsonsafe.UntrustedJSONError:
        return None


class UsageReader:
    """Feed a reply's body chunks; ``result()`` is the usage it stated (the last one wins).

    ``media_type`` picks the framing: ``text/event-stream`` (SSE ``data:`` lines),
    ``application/x-ndjson`` (one JSON object per line), anything else one whole JSON body.
    """

    def __init__(self, media_type: str | None, *, limit: int = DEFAULT_LIMIT) -> None:
        kind = wire.media_type(media_type)
        self._framing = "whole"
        if kind == wire.SSE:
            self._framing = "sse"
        elif kind == wire.NDJSON:
            self._framing = "ndjson"
        self._limit = limit
        self._buffer = bytearray()
        self._overflow = False  # the current line (or whole body) passed the limit: skip it
        self._usage: Usage | None = None
        self._running: Usage | None = None
        self._text: list[str] = []
        self._text_size = 0
        # Keep the completion text (a metered reply: counted by the engine's tokenizer if it
        # ends early); off by default, so other replies hold no copy of it.
        self.keep_text = False

    @property
    def running(self) -> Usage | None:
        """The last counts any stream event stated so far (usage or per-token timings)."""
        return self._running

    @property
    def text(self) -> str:
        """The completion text streamed so far (at most TEXT_LIMIT characters)."""
        return "".join(self._text)

    def feed(self, chunk: bytes) -> None:
        if self._framing == "whole":
            if not self._overflow:
                self._buffer += chunk
                if len(self._buffer) > self._limit:
                    self._overflow = True
                    self._buffer.clear()
            return
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            piece = chunk[start:] if end < 0 else chunk[start:end]
            if not self._overflow:
                self._buffer += piece
                if len(self._buffer) > self._limit:
                    self._overflow = True
                    self._buffer.clear()
            if end < 0:
                return
            self._line()
            start = end + 1

    def _line(self) -> None:
        line = bytes(self._buffer).rstrip(b"\r")
        skipped = self._overflow
        self._buffer.clear()
        self._overflow = False
        if skipped:
            return
        if self._framing == "sse":
            if not line.startswith(b"data:"):
                return
            line = line[5:].strip()
            if line == b"[DONE]":
                return
        document = _parsed(line) if line.strip() else None
        counts = stated_counts(document)
        if counts is not None:
            # Each count as last stated: Anthropic states input and output in different events.
            self._usage = _merged(self._usage, counts)
        running = running_of(document)
        if counts is not None and running is None:
            running = _merged(self._running, counts)  # an Anthropic message_delta
        if running is not None:
            self._running = running
        piece = text_of(document) if self.keep_text else ""
        if piece and self._text_size < TEXT_LIMIT:
            piece = piece[: TEXT_LIMIT - self._text_size]
            self._text.append(piece)
            self._text_size += len(piece)

    def result(self) -> Usage | None:
        """The usage stated so far (call at the end of the body)."""
        if self._framing == "whole":
            if self._overflow or not self._buffer:
                return None
            document = _parsed(bytes(self._buffer))
            if self.keep_text:
                self._text = [text_of(document)[:TEXT_LIMIT]]
            return usage_of(document)
        if self._buffer and not self._overflow:
            self._line()  # a last line without its newline
        return self._usage
