"""paygate.upstream.usage: token usage from whole replies and streams, in any chunking."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from paygate.upstream.usage import Usage, UsageReader, usage_from_body

OPENAI_STREAM = (
    b'data: {"choices":[{"delta":{"role":"assistant","content":null}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":" Paris"}}]}\n\n'
    b'data: {"choices":[{"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"completion_tokens":8,"prompt_tokens":19,"total_tokens":27}}\n\n'
    b"data: [DONE]\n\n"
)
OLLAMA_STREAM = (
    b'{"message":{"content":" a"},"done":false}\n'
    b'{"message":{"content":""},"done":true,"prompt_eval_count":12,"eval_count":5}\n'
)


def _read(media_type: str, body: bytes, cuts: list[int]) -> Usage | None:
    reader = UsageReader(media_type)
    start = 0
    for cut in sorted(set(cuts)):
        reader.feed(body[start:cut])
        start = cut
    reader.feed(body[start:])
    return reader.result()


@given(st.lists(st.integers(min_value=0, max_value=len(OPENAI_STREAM)), max_size=12))
def test_openai_stream_usage_in_any_chunking(cuts: list[int]) -> None:
    assert _read("text/event-stream; charset=utf-8", OPENAI_STREAM, cuts) == Usage(19, 8)


@given(st.lists(st.integers(min_value=0, max_value=len(OLLAMA_STREAM)), max_size=12))
def test_ollama_stream_usage_in_any_chunking(cuts: list[int]) -> None:
    assert _read("application/x-ndjson", OLLAMA_STREAM, cuts) == Usage(12, 5)


def test_whole_replies() -> None:
    openai = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    assert usage_from_body(json.dumps(openai).encode()) == Usage(3, 4)
    assert Usage(3, 4).total_tokens == 7
    ollama = {"done": True, "prompt_eval_count": 7, "eval_count": 2}
    assert _read("application/json", json.dumps(ollama).encode(), [5]) == Usage(7, 2)
    embeddings = {"data": [], "usage": {"prompt_tokens": 6, "total_tokens": 6}}
    assert usage_from_body(json.dumps(embeddings).encode()) == Usage(6, 0)


def test_nothing_stated_or_garbage_is_none() -> None:
    assert _read("text/event-stream", b'data: {"choices":[]}\n\ndata: [DONE]\n\n', []) is None
    assert usage_from_body(b"not json") is None
    assert usage_from_body(b'{"usage": {"prompt_tokens": -1}}') is None
    assert usage_from_body(b'{"usage": {"prompt_tokens": true}}') is None
    assert usage_from_body(b"[1, 2]") is None
    assert _read("application/x-ndjson", b"\xff\xfe\n{]\n", []) is None


def test_buffers_are_bounded() -> None:
    reader = UsageReader("application/json", limit=64)
    reader.feed(b'{"pad": "' + b"x" * 100 + b'", "usage": {"prompt_tokens": 1}}')
    assert reader.result() is None  # too big to read: unknown, never an unbounded buffer
    stream = UsageReader("text/event-stream", limit=64)
    stream.feed(b"data: " + b"x" * 200 + b"\n\n")
    stream.feed(b'data: {"usage":{"prompt_tokens":2,"completion_tokens":1}}\n\n')
    assert stream.result() == Usage(2, 1)  # a long line is skipped, the next one still read


def test_running_counts_and_text_of_a_stream_cut_short() -> None:
    # llama-server's per-token timings, then vLLM's continuous usage: the last one is running.
    llama = (
        b'data: {"choices":[{"delta":{"content":"The"}}],"timings":{"prompt_n":9,"predicted_n":1}}'
        b'\n\ndata: {"choices":[{"delta":{"content":" sea"}}],'
        b'"timings":{"prompt_n":9,"predicted_n":2}}\n\n'
    )
    reader = UsageReader("text/event-stream")
    reader.keep_text = True
    for i in range(0, len(llama), 5):
        reader.feed(llama[i : i + 5])
    assert reader.running == Usage(9, 2)
    assert reader.text == "The sea"
    vllm = (
        b'data: {"choices":[{"delta":{"content":"x"}}],'
        b'"usage":{"prompt_tokens":4,"completion_tokens":3}}\n\n'
    )
    other = UsageReader("text/event-stream")
    other.feed(vllm)
    assert other.running == Usage(4, 3)
    assert other.text == ""  # kept only when asked (a metered reply)
