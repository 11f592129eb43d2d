"""Nothing in clear on a sealed reply but what transport needs: every clear header of every
sealed reply, on every paid route of the default table (whole and streamed, v2 and v1, exact
and metered payments), carries no model name and no token count; the clear payment receipt
says what x402 requires and no usage; the signed receipt header is sealed.

The real gateway, paid through the x402 SDK facilitator on anvil, the real client; a recording
httpx transport under it sees the headers as they crossed the wire.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from enclave import receipts
from paygate.client import AttestationPolicy, PaygateTransport, SpendPolicy
from paygate.server.routes import default_routes
from paygate.upstream.shaping import GENERATION_PATHS
from paygate.x402.models import USAGE_EXTENSION
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import paid_settings
from tests.fixtures.upto_support import upto_settings

MODEL = "fake-llama:latest"
NAME = "fake-llama"
SPEND = SpendPolicy(
    max_per_request="0.1", max_total="5", networks=["base-sepolia"], max_price_per_million="400"
)
# What transport needs, and nothing else, may be in clear.
ALLOWED = frozenset(
    {
        "content-type",
        "content-length",
        "transfer-encoding",
        "date",
        "server",
        "cache-control",
        "x-request-id",
        "x-paygate-envelope",
        "x-paygate-content-type",
        "x-paygate-overhead-ms",
        "x-paygate-receipt",
        "payment-response",
        "x-payment-response",
    }
)
# Values that are random or timing, checked otherwise (the receipts) or not content at all.
_NUMBERS_EXEMPT = frozenset(
    {
        "content-length",
        "date",
        "server",
        "x-request-id",
        "x-paygate-envelope",
        "x-paygate-overhead-ms",
        "x-paygate-receipt",
        "payment-response",
        "x-payment-response",
    }
)
MESSAGES = [{"role": "user", "content": "what may a middlebox read"}]
BODIES: dict[str, Any] = {
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES},
    "/v1/completions": {"model": MODEL, "prompt": "what may a middlebox read"},
    "/v1/embeddings": {"model": MODEL, "input": "what may a middlebox read"},
    "/api/chat": {"model": MODEL, "messages": MESSAGES, "stream": False},
    "/api/generate": {"model": MODEL, "prompt": "what may a middlebox read", "stream": False},
    "/api/embed": {"model": MODEL, "input": "what may a middlebox read"},
    "/api/embeddings": {"model": MODEL, "prompt": "what may a middlebox read"},
    "/api/show": {"model": MODEL},
    "/v1/batch/chat/completions": [{"model": MODEL, "messages": MESSAGES}],
}
STREAMED = ("/v1/chat/completions", "/v1/completions", "/api/chat", "/api/generate")


class Recorder(httpx.HTTPTransport):
    """The real HTTP transport, keeping every response's headers as they came."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, httpx.Headers]] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        self.seen.append((request.url.path, response.headers))
        return response


def _requests(metered_only: bool) -> list[tuple[str, str, Any]]:
    out: list[tuple[str, str, Any]] = []
    for route in default_routes().routes:
        if route.target not in ("upstream", "batch"):
            continue
        if metered_only and route.path not in GENERATION_PATHS and route.target != "batch":
            continue
        path = route.path.replace("{model}", MODEL)
        body = BODIES.get(route.path)
        out.append((route.method, path, body))
        if route.path in STREAMED:
            assert isinstance(body, dict)
            streamed = dict(body)
            streamed["stream"] = True
            out.append((route.method, path, streamed))
    return out


@pytest.fixture(params=["exact", "upto"])
def stack(
    request: pytest.FixtureRequest, facilitator: Any, seller: str, tmp_path: Path
) -> Iterator[Stack]:
    extra = upto_settings(payment_schemes=["upto"]) if request.param == "upto" else {}
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "ledger.db",
        require_encryption=True,
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
        **extra,
    )
    with ThreadedStack(**settings) as running:
        yield running


def _numbers_of(plaintext: bytes) -> set[str]:
    """The token counts a reply states (OpenAI usage, Ollama counts), as decimal strings."""
    found = re.findall(
        rb'"(?:prompt_tokens|completion_tokens|total_tokens|prompt_eval_count|eval_count)"'
        rb"\s*:\s*(\d+)",
        plaintext,
    )
    return {n.decode() for n in found}


@pytest.mark.parametrize("envelope", ["v2", "v1"])
def test_no_clear_header_of_a_sealed_reply_names_the_model_or_a_token_count(
    stack: Stack, upto_payer: Any, envelope: str
) -> None:
    recorder = Recorder()
    transport = PaygateTransport(
        transport=recorder,
        envelope=envelope,  # type: ignore[arg-type]
        wallet=upto_payer,
        spend=SPEND,
        attestation=AttestationPolicy(allow_unattested=True),
    )
    checked = 0
    with httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client:
        # An upto-only gateway prices only the generating routes (the others answer exact
        # offers it does not take): those are the routes whose receipts carried usage.
        metered_only = list(stack.settings.payment_schemes) == ["upto"]
        for method, path, body in _requests(metered_only):
            if envelope == "v1" and isinstance(body, dict) and body.get("stream"):
                continue  # v1 seals whole replies only: the same as its whole request
            recorder.seen.clear()
            reply = client.request(method, path, json=body)
            assert reply.status_code == 200, (path, reply.text)
            assert reply.extensions["paygate"].envelope == envelope
            assert reply.extensions["paygate_receipt"].claims is not None  # verified, inside
            counts = _numbers_of(reply.content)
            _, headers = recorder.seen[-1]
            for name, value in headers.multi_items():
                lower = name.lower()
                assert lower in ALLOWED, (path, name)
                assert NAME not in value, (path, name)
                if lower not in _NUMBERS_EXEMPT:
                    assert not counts & set(re.findall(r"\d+", value)), (path, name, value)
            _receipts_say_nothing(headers)
            checked += 1
    assert checked >= (5 if metered_only else 12)
    if "upto" in stack.settings.payment_schemes:  # the metered routes were paid metered
        assert "upto" in {payment.scheme for payment in transport.payments}


def _receipts_say_nothing(headers: httpx.Headers) -> None:
    sealed = headers.get("x-paygate-receipt")
    if sealed is not None:
        with pytest.raises(receipts.ReceiptTokenInvalid):
            receipts.unverified_claims(sealed)  # not a token: sealed to the caller
    for name in ("payment-response", "x-payment-response"):
        value = headers.get(name)
        if value is None:
            continue
        receipt = json.loads(base64.b64decode(value))
        assert USAGE_EXTENSION not in (receipt.get("extensions") or {})
        assert "Tokens" not in json.dumps(receipt)
