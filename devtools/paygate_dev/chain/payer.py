"""Paying like a real x402 client: the official SDK signs, we only shape its input and output.

``sign_v2_payment`` and ``sign_v1_payment`` return the JSON a client puts (base64-encoded) in
``PAYMENT-SIGNATURE`` (v2) or ``X-PAYMENT`` (v1). The SDK's spend controls (known assets only, at
most $1 a payment) are switched off here: tests choose their amounts on purpose.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from eth_account.signers.local import LocalAccount
from x402 import x402ClientSync
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.upto import UptoEvmClientScheme
from x402.schemas import PaymentRequired
from x402.schemas.v1 import PaymentRequiredV1

from paygate_dev.chain.anvil import NETWORK, NETWORK_V1, USDC_ADDRESS, USDC_NAME, USDC_VERSION

DEFAULT_RESOURCE = "http://127.0.0.1/v1/chat/completions"


def requirements_v2(
    pay_to: str,
    amount: int | str,
    *,
    asset: str = USDC_ADDRESS,
    network: str = NETWORK,
    max_timeout_seconds: int = 300,
    name: str = USDC_NAME,
    version: str = USDC_VERSION,
) -> dict[str, Any]:
    """One v2 ``accepts`` entry for the exact scheme (amount in atomic units)."""
    return {
        "scheme": "exact",
        "network": network,
        "asset": asset,
        "amount": str(amount),
        "payTo": pay_to,
        "maxTimeoutSeconds": max_timeout_seconds,
        "extra": {"name": name, "version": version},
    }


def requirements_upto(
    pay_to: str,
    amount: int | str,
    *,
    facilitator: str,
    asset: str = USDC_ADDRESS,
    network: str = NETWORK,
    max_timeout_seconds: int = 300,
    name: str = USDC_NAME,
    version: str = USDC_VERSION,
) -> dict[str, Any]:
    """One v2 ``accepts`` entry for the upto scheme: ``amount`` is the maximum (atomic units),
    ``facilitator`` the address the Permit2 witness binds settlement to."""
    return {
        "scheme": "upto",
        "network": network,
        "asset": asset,
        "amount": str(amount),
        "payTo": pay_to,
        "maxTimeoutSeconds": max_timeout_seconds,
        "extra": {
            "name": name,
            "version": version,
            "assetTransferMethod": "permit2",
            "facilitatorAddress": facilitator,
        },
    }


def requirements_v1(
    pay_to: str,
    amount: int | str,
    *,
    resource: str = DEFAULT_RESOURCE,
    asset: str = USDC_ADDRESS,
    network: str = NETWORK_V1,
    max_timeout_seconds: int = 300,
    name: str = USDC_NAME,
    version: str = USDC_VERSION,
) -> dict[str, Any]:
    """One v1 ``accepts`` entry for the exact scheme (``maxAmountRequired`` in atomic units)."""
    return {
        "scheme": "exact",
        "network": network,
        "maxAmountRequired": str(amount),
        "resource": resource,
        "description": "paygate dev payment",
        "mimeType": "application/json",
        "payTo": pay_to,
        "maxTimeoutSeconds": max_timeout_seconds,
        "asset": asset,
        "extra": {"name": name, "version": version},
    }


def _client(account: LocalAccount) -> x402ClientSync:
    client = x402ClientSync()
    register_exact_evm_client(client, EthAccountSigner(account))
    client.register("eip155:*", UptoEvmClientScheme(EthAccountSigner(account)))
    client.set_spend_controls(False)
    return client


def sign_v2_payment(
    account: LocalAccount, requirements: dict[str, Any], resource: str = DEFAULT_RESOURCE
) -> dict[str, Any]:
    """A v2 PaymentPayload for one requirement, signed by the SDK's paying client."""
    required = PaymentRequired.model_validate(
        {"x402Version": 2, "resource": {"url": resource}, "accepts": [requirements]}
    )
    payload = _client(account).create_payment_payload(required)
    return payload.model_dump(mode="json", by_alias=True, exclude_none=True)


def sign_v1_payment(account: LocalAccount, requirements: dict[str, Any]) -> dict[str, Any]:
    """A v1 payment (``{x402Version:1, scheme, network, payload}``), signed by the SDK's v1 client.

    The SDK's v1 client sets validAfter to now - 600 s and validBefore to now + maxTimeoutSeconds.
    """
    required = PaymentRequiredV1.model_validate({"x402Version": 1, "accepts": [requirements]})
    payload = _client(account).create_payment_payload(required)
    return payload.model_dump(mode="json", by_alias=True, exclude_none=True)


def encode_header(payment: dict[str, Any]) -> str:
    """base64(JSON), as sent in PAYMENT-SIGNATURE (v2) or X-PAYMENT (v1)."""
    return base64.b64encode(json.dumps(payment, separators=(",", ":")).encode()).decode()


def facilitator_request(payment: dict[str, Any], requirements: dict[str, Any]) -> dict[str, Any]:
    """The body of POST /verify and /settle for a payment and the requirement it answers."""
    return {
        "x402Version": payment["x402Version"],
        "paymentPayload": payment,
        "paymentRequirements": requirements,
    }
