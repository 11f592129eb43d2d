"""x402's bazaar discovery: every paid route declares what it takes and answers on its 402, and
the official SDK's bazaar helpers — what a facilitator runs to catalog a resource — read it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import aiohttp
from x402 import x402Client
from x402.extensions.bazaar import (
    BodyDiscoveryInfo,
    QueryDiscoveryInfo,
    extract_discovery_info,
    validate_discovery_extension,
    validate_discovery_extension_spec,
)
from x402.extensions.bazaar.types import parse_discovery_extension
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from paygate import wire
from paygate.server.routes import default_routes
from tests.fixtures.payment_support import CHAT, CHAT_BODY, paid_stack

PAID = [r for r in default_routes().routes if r.paid]


def _url_path(template: str) -> str:
    return template.replace("{model}", "fake-llama")


async def _probe(session: aiohttp.ClientSession, url: str, method: str, **kw: Any):
    async with session.request(method, url, **kw) as response:
        assert response.status == 402, (method, url, response.status, await response.text())
        v2 = json.loads(base64.b64decode(response.headers[wire.PAYMENT_REQUIRED]))
        return v2, await response.json(), response.headers


def _as_payment(required: dict[str, Any]) -> dict[str, Any]:
    # What the SDK's client sends back: the chosen requirement, the resource and the
    # server's extensions echoed (x402Client copies them into the payload).
    return {
        "x402Version": 2,
        "resource": required["resource"],
        "accepted": required["accepts"][0],
        "payload": {},
        "extensions": required["extensions"],
    }


async def test_every_paid_route_is_read_by_the_sdk_bazaar_helpers(
    facilitator, payer, seller, tmp_path
):
    assert len(PAID) >= 12
    async with (
        paid_stack(
            seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "payments.db"
        ) as stack,
        aiohttp.ClientSession() as session,
    ):
        for route in PAID:
            path = _url_path(route.path)
            # A bare probe: no payment, no body — answered before any input validation.
            required, v1_body, headers = await _probe(session, stack.url + path, route.method)
            assert len(headers[wire.PAYMENT_REQUIRED]) < 8 * 1024
            extension = required["extensions"]["bazaar"]
            assert validate_discovery_extension(parse_discovery_extension(extension)).valid
            assert validate_discovery_extension_spec(extension).valid, route
            found = extract_discovery_info(_as_payment(required), required["accepts"][0])
            assert found is not None, route
            assert found.method == route.method
            assert found.x402_version == 2
            assert found.mime_type == "application/json"
            assert found.description
            assert found.description.startswith("paygate inference: ")
            if "{" in route.path:
                assert found.route_template == "/v1/models/:model"
                assert found.resource_url == stack.url + "/v1/models/:model"
                assert found.discovery_info.input.path_params == {"model": "fake-llama"}
            else:
                assert found.resource_url == stack.url + path
            if route.method == "POST":
                assert isinstance(found.discovery_info, BodyDiscoveryInfo)
                assert found.discovery_info.input.body_type == "json"
                body_schema = extension["schema"]["properties"]["input"]["properties"]["body"]
                assert body_schema["type"] in ("object", "array")
            else:
                assert isinstance(found.discovery_info, QueryDiscoveryInfo)
            assert found.discovery_info.output is not None
            # x402 v1 facilitators read the same facts from each requirement's outputSchema.
            v1 = extract_discovery_info({"x402Version": 1}, v1_body["accepts"][0])
            assert v1 is not None
            assert v1.method == route.method
        chat = extract_discovery_info(*_chat(await _probe(session, stack.url + CHAT, "POST")))
        assert chat is not None
        schema = chat.discovery_info.input.body
        assert schema["model"]
        assert schema["messages"][0]["role"] == "user"


def _chat(probe: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    required, _, _ = probe
    return _as_payment(required), required["accepts"][0]


async def test_a_probe_with_a_broken_body_gets_the_402_and_a_payment_does_not(
    facilitator, payer, seller, tmp_path
):
    async with (
        paid_stack(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=tmp_path / "payments.db",
            model_prices={"fake-llama": "0.002"},  # the price needs the body
        ) as stack,
        aiohttp.ClientSession() as session,
    ):
        for path, body in ((CHAT, b"{not json"), ("/v1/batch/chat/completions", b"{}")):
            required, _, _ = await _probe(
                session,
                stack.url + path,
                "POST",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            assert "bazaar" in required["extensions"]
        # With a payment the body is judged as before: the caller's 400, no charge.
        async with session.post(
            stack.url + CHAT,
            data=b"{not json",
            headers={"Content-Type": "application/json", wire.PAYMENT_SIGNATURE: "e30="},
        ) as response:
            assert response.status == 400
            assert response.headers[wire.ERROR_HEADER] == "invalid_json"


async def test_the_facilitator_catalogs_a_paid_request_of_the_sdk_client(
    facilitator, usdc, payer, seller, tmp_path
):
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    before = len(facilitator.stats.received("settle"))
    async with (
        paid_stack(
            seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "payments.db"
        ) as stack,
        x402HttpxClient(client, timeout=30) as http,
    ):
        response = await http.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
    # What the facilitator was given to settle carries the declaration (echoed by the SDK
    # client inside its payment header, within the header limit): it catalogs the route.
    (settled,) = facilitator.stats.received("settle")[before:]
    found = extract_discovery_info(settled["paymentPayload"], settled["paymentRequirements"])
    assert found is not None
    assert (found.method, found.resource_url) == ("POST", stack.url + CHAT)
    assert found.discovery_info.input.body["messages"]
    assert found.description == "paygate inference: " + (
        "Chat completion (OpenAI API); stream: true answers server-sent events"
    )
