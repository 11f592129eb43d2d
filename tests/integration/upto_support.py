"""A gateway that offers metered (`upto`) payments, for the upto tests: token prices chosen so
one token is a whole number of atomic units (100 in, 400 out), the output cap small."""

from __future__ import annotations

import base64
import json
from typing import Any

from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.upto import UptoEvmClientScheme

from paygate import wire
from paygate.x402.models import USAGE_EXTENSION

IN_ATOMIC = 100  # atomic units per prompt token: "100" USDC per million tokens
OUT_ATOMIC = 400  # per completion token
CAP = 64  # PAYGATE_MAX_TOKENS_CAP in these tests
TOKEN_PRICES = {"*": {"input": "100", "output": "400"}}


def upto_settings(**overrides: Any) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "payment_schemes": ["exact", "upto"],
        "token_prices": TOKEN_PRICES,
        "max_tokens_cap": CAP,
    }
    settings.update(overrides)
    return settings


def charge(prompt_tokens: int, completion_tokens: int) -> int:
    return IN_ATOMIC * prompt_tokens + OUT_ATOMIC * completion_tokens


def sdk_upto_client(payer: Any) -> x402HttpxClient:
    """The official SDK's HTTP client that pays `upto` only."""
    client = x402Client()
    client.register("eip155:*", UptoEvmClientScheme(EthAccountSigner(payer)))
    return x402HttpxClient(client, timeout=30)


def upto_offer(required: dict[str, Any]) -> dict[str, Any]:
    (offer,) = [o for o in required["accepts"] if o["scheme"] == "upto"]
    return offer


def decoded(value: str) -> dict[str, Any]:
    return json.loads(base64.b64decode(value))


def usage_of_receipt(receipt: dict[str, Any]) -> dict[str, Any]:
    return receipt["extensions"][USAGE_EXTENSION]["info"]


def receipt_header(headers: Any) -> dict[str, Any]:
    return decoded(headers[wire.PAYMENT_RESPONSE])
