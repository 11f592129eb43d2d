"""The transport's own behaviour against the real gateway (payments off): what is sealed, what
is fetched and how often, the bounds."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from paygate.client import PaygateTransport, ReplyTooLarge, RequestTooLarge
from tests.fixtures.gateway_support import Stack, ThreadedStack

CHAT = {"model": "fake-llama:latest", "messages": [{"role": "user", "content": "hi"}]}


class CountingTransport(httpx.HTTPTransport):
    """httpx's own transport, counting the requests that go out by path."""

    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.paths.append(request.url.path)
        return super().handle_request(request)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ThreadedStack(require_encryption=True) as running:
        yield running


def test_the_key_is_fetched_once_for_many_threads(stack: Stack) -> None:
    counting = CountingTransport()
    transport = PaygateTransport(transport=counting)
    with httpx.Client(transport=transport, base_url=stack.url, timeout=15) as client:

        def post() -> None:
            assert client.post("/v1/chat/completions", json=CHAT).status_code == 200

        threads = [threading.Thread(target=post) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert counting.paths.count("/v1/enclave/pubkey") == 1
    assert counting.paths.count("/v1/chat/completions") == 8


def test_get_routes_are_sealed_and_local_routes_are_not(stack: Stack) -> None:
    with httpx.Client(transport=PaygateTransport(), base_url=stack.url, timeout=15) as client:
        models = client.get("/v1/models")
        health = client.get("/health")
    assert models.extensions["paygate"].envelope == "v2"
    assert models.json()["object"] == "list"
    assert health.extensions["paygate"].envelope == "plain"
    assert health.json()["status"] == "ok"


def test_upstream_errors_come_back_sealed_and_gateway_errors_in_the_clear(stack: Stack) -> None:
    with httpx.Client(transport=PaygateTransport(), base_url=stack.url, timeout=15) as client:
        upstream = client.post("/v1/chat/completions", json={**CHAT, "model": "fake-error-404"})
        gateway = client.post("/api/pull", json={})
    assert upstream.status_code == 404
    assert upstream.extensions["paygate"].envelope == "v2"
    assert upstream.json()["error"]["message"] == "injected error 404"
    assert gateway.status_code == 404
    assert gateway.extensions["paygate"].envelope == "plain"


def test_request_bound_is_checked_before_anything_is_sent(stack: Stack) -> None:
    counting = CountingTransport()
    transport = PaygateTransport(transport=counting, max_request_bytes=64)
    with (
        httpx.Client(transport=transport, base_url=stack.url, timeout=15) as client,
        pytest.raises(RequestTooLarge),
    ):
        client.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 100})
    assert counting.paths == []


def test_a_v1_reply_past_the_bound_is_refused(stack: Stack) -> None:
    transport = PaygateTransport(envelope="v1", max_sealed_reply_bytes=200)
    with (
        httpx.Client(transport=transport, base_url=stack.url, timeout=15) as client,
        pytest.raises(ReplyTooLarge),
    ):
        client.post("/v1/chat/completions", json=CHAT)


def test_plain_mode_sends_no_seal(stack: Stack) -> None:
    with httpx.Client(
        transport=PaygateTransport(envelope="plain"), base_url=stack.url, timeout=15
    ) as client:
        reply = client.post("/v1/chat/completions", json=CHAT)
    assert reply.status_code == 415  # this gateway requires encryption
    assert reply.headers["X-Paygate-Error"] == "encryption_required"
