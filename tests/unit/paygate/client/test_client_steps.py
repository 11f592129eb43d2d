"""The steps both transports run (paygate.client.steps), driven here by hand: no I/O is needed
to see which step comes next, what a failed step leaves behind, and when a key is cached."""

from __future__ import annotations

import json

import httpx
import pytest

import enclave
from enclave import SoftwareKey
from paygate.client.core import (
    ClientCore,
    Discard,
    Envelope,
    LoadKey,
    ReadBody,
    ReadRequest,
    Send,
)
from paygate.client.errors import AttestationFailed, PinMismatch, ReplyTooLarge
from paygate.client.pubkey import parse_pubkey_document
from paygate.client.steps import Hook, Run, key_steps, request_steps

ORIGIN = "http://127.0.0.1:8402"
POINT = SoftwareKey.generate().public_key
DOCUMENT = json.dumps({"pubkey": POINT.hex()}).encode()


def core(envelope: Envelope = "v2", pin: str | None = None) -> ClientCore:
    return ClientCore(
        envelope=envelope,
        pin=pin,
        wallet=None,
        spend=None,
        x402_version=None,
        pubkey_url=None,
        on_receipt=None,
        max_request_bytes=1024,
        max_sealed_reply_bytes=1024,
    )


def chat() -> httpx.Request:
    return httpx.Request("POST", ORIGIN + "/v1/chat/completions", content=b'{"model":"m"}')


def test_a_failed_read_after_a_send_discards_the_reply_before_the_error() -> None:
    c = core("v1")
    c.store_key(parse_pubkey_document(ORIGIN, 200, DOCUMENT), None)
    run = Run(request_steps(c, chat()))
    assert isinstance(run.step, ReadRequest)
    run.send(b'{"model":"m"}')
    assert isinstance(run.step, Send)  # the cached key: no LoadKey, so no lock and no fetch
    reply = httpx.Response(200, headers={"Content-Type": enclave.CONTENT_TYPE})
    run.send(reply)
    assert isinstance(run.step, ReadBody)
    assert run.step.response is reply
    run.throw(ReplyTooLarge("the sealed v1 reply passed 1024 bytes"))
    assert isinstance(run.step, Discard)  # never left open
    assert run.step.response is reply
    with pytest.raises(ReplyTooLarge):
        run.send(None)


def test_a_reply_that_fails_to_close_leaves_the_first_error_raised() -> None:
    c = core("v1")
    c.store_key(parse_pubkey_document(ORIGIN, 200, DOCUMENT), None)
    run = Run(request_steps(c, chat()))
    run.send(b'{"model":"m"}')
    run.send(httpx.Response(200, headers={"Content-Type": enclave.CONTENT_TYPE}))
    run.throw(ReplyTooLarge("the sealed v1 reply passed 1024 bytes"))
    assert isinstance(run.step, Discard)
    with pytest.raises(ReplyTooLarge):  # not the close's error, and the flow is closed
        run.throw(httpx.ReadError("the connection broke while closing"))


def test_a_connection_error_on_an_unpaid_send_is_raised_as_it_is() -> None:
    run = Run(request_steps(core("plain"), chat()))
    run.send(b"{}")
    assert isinstance(run.step, Send)
    with pytest.raises(httpx.ConnectError):
        run.throw(httpx.ConnectError("refused"))


def test_a_key_is_fetched_asked_about_and_only_then_cached() -> None:
    c = core()
    run = Run(request_steps(c, chat()))
    run.send(b"{}")
    assert isinstance(run.step, LoadKey)  # nothing cached: the transport takes its lock
    fetch = Run(key_steps(c, run.step))
    assert isinstance(fetch.step, Send)
    assert str(fetch.step.request.url) == ORIGIN + "/v1/enclave/pubkey"
    fetch.send(httpx.Response(200))
    assert isinstance(fetch.step, ReadBody)
    fetch.send(DOCUMENT)
    assert isinstance(fetch.step, Hook)
    assert fetch.step.key.public_key == POINT
    assert c.cached_key(ORIGIN) is None  # not before the hook let it through
    fetch.send(None)
    assert fetch.step is None
    assert fetch.result.public_key == POINT
    assert c.cached_key(ORIGIN) == fetch.result


def test_a_key_the_hook_refuses_is_never_cached() -> None:
    c = core()
    fetch = Run(key_steps(c, LoadKey(ORIGIN, chat())))
    fetch.send(httpx.Response(200))
    fetch.send(DOCUMENT)
    assert isinstance(fetch.step, Hook)
    with pytest.raises(AttestationFailed, match="not this appliance"):
        fetch.throw(RuntimeError("not this appliance"))
    assert c.cached_key(ORIGIN) is None


def test_a_pinned_key_is_refused_before_the_hook_is_asked() -> None:
    c = core(pin="ab" * 32)
    fetch = Run(key_steps(c, LoadKey(ORIGIN, chat())))
    fetch.send(httpx.Response(200))
    with pytest.raises(PinMismatch):
        fetch.send(DOCUMENT)
    assert c.cached_key(ORIGIN) is None


def test_a_key_fetched_while_this_request_waited_for_the_lock_is_taken_as_it_is() -> None:
    c = core()
    key = parse_pubkey_document(ORIGIN, 200, DOCUMENT)
    c.store_key(key, None)
    fetch = Run(key_steps(c, LoadKey(ORIGIN, chat())))
    assert fetch.step is None
    assert fetch.result == key
