"""The request event skips its LogRecord when the installed handler is its only destination:
the line it writes must be the one the record would have given, in both formats, and any other
destination (a capture handler, a filter, a secret that rewrites the message) must get the
record as before."""

from __future__ import annotations

import asyncio
import io
import logging
import os
from collections.abc import Iterator

import pytest

from paygate.server import logs

EVENT: dict[str, object] = {
    "request_id": "0123abcd",
    "method": "POST",
    "route": "POST /v1/chat/completions",
    "status": 200,
    "duration_ms": 1.25,
    "payment": "free",
    "upstream_ms": 0.5,
}


@pytest.fixture
def installed() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


def _install(log_format: str, **kwargs: object) -> tuple[logs.DeferredStreamHandler, io.StringIO]:
    handler = logs.install_logging("INFO", log_format, **kwargs)  # type: ignore[arg-type]
    stream = io.StringIO()
    handler.setStream(stream)
    assert isinstance(handler, logs.DeferredStreamHandler)
    return handler, stream


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize(
    "event",
    [
        EVENT,
        {k: v for k, v in EVENT.items() if k != "request_id"},  # the context's id goes first
        {"status": 499, "request_id": "0123abcd", "caller_gone": True},  # in another order
    ],
)
def test_the_recordless_line_equals_the_records(
    installed: None, log_format: str, event: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("time.time", lambda: 1_790_000_000.0421)  # one clock for both lines
    # A secret in the event (a trusted proxy's request id) is redacted on both paths.
    handler, stream = _install(log_format, secrets=["0123abcd"])
    log = logging.getLogger("paygate.request")
    assert logs._event_sink(log) is handler

    async def both() -> None:
        token = logs._current_request.set("0123abcd")
        try:
            log.info("request", extra={"event": event})
            handler.defer_event("0123abcd", event)
        finally:
            logs._current_request.reset(token)

    asyncio.run(both())
    by_record, by_event = stream.getvalue().splitlines()
    assert by_event == by_record
    assert "2026-09-21T14:13:20.042Z" in by_event
    assert "0123abcd" not in by_event


def test_another_destination_gets_the_record(installed: None) -> None:
    _install("text")
    log = logging.getLogger("paygate.request")
    capture = logging.Handler()
    log.addHandler(capture)
    try:
        assert logs._event_sink(log) is None  # e.g. pytest's caplog, an operator's handler
    finally:
        log.removeHandler(capture)
    log.addFilter(logging.Filter("other"))
    try:
        assert logs._event_sink(log) is None
    finally:
        log.removeFilter(log.filters[0])
    root_handler = logging.getLogger().handlers[0]
    root_handler.addFilter(logging.Filter())
    try:
        assert logs._event_sink(log) is None  # the handler's filters changed
    finally:
        root_handler.removeFilter(root_handler.filters[-1])
    assert logs._event_sink(log) is root_handler


def test_a_secret_matching_the_message_keeps_the_record(installed: None) -> None:
    # The secret-text filter would rewrite the message "request": only the record path does.
    _install("text", secret_urls=["http://user:request@rpc.example/path"])
    assert logs._event_sink(logging.getLogger("paygate.request")) is None


def test_warning_level_writes_no_event(installed: None) -> None:
    logs.install_logging("WARNING", "text")
    assert logs._event_sink(logging.getLogger("paygate.request")) is None


def test_request_ids_are_random_and_distinct_across_a_fork() -> None:
    ids = {logs.request_id_for(None, None, ()) for _ in range(1000)}  # several blocks
    assert len(ids) == 1000
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    logs.request_id_for(None, None, ())  # the parent holds a block now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id must not be the parent's next
        os.write(write, logs.request_id_for(None, None, ()).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    os.close(write)
    assert child != logs.request_id_for(None, None, ())
