"""A hosted facilitator that wants a short-lived JWT on every call (Coinbase CDP style).

The facilitator stand-in is the SDK facilitator behind a guard that verifies each token with
PyJWT (paygate_dev.chain.jwt_guard) — another implementation than the gateway's signer — for
the test key, this call's method and URL, and the token's age.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from paygate_dev.chain.accounts import FACILITATOR
from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings
from paygate_dev.chain.jwt_guard import JwtGuard
from pydantic import SecretStr

from paygate.config import ConfigError, load_settings
from paygate.x402.facilitator_auth import CdpJwt
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    paid_stack,
    post,
    receipt_of,
    v2_header,
)
from tests.fixtures.upto_support import (
    charge,
    receipt_header,
    sdk_upto_client,
    upto_settings,
)

KEY_ID = "organizations/7f3c1e0a-5b2d-4c8e-9a61-0d2f4b6c8e10/apiKeys/1a2b3c4d-5e6f"
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def _ec_pem() -> str:
    return EC_KEY.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()


def _ed_base64() -> str:
    # CDP issues Ed25519 secrets as base64 of the 32-byte seed followed by the public key.
    raw = ED_KEY.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = ED_KEY.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return base64.b64encode(raw + public).decode()


def _facilitator(anvil, public_key) -> FacilitatorServer:
    return FacilitatorServer(
        FacilitatorSettings(
            rpc_url=anvil.rpc_url,
            private_key=anvil.accounts[FACILITATOR].key,
            jwt_guard=JwtGuard(KEY_ID, public_key, max_lifetime=120),
        )
    ).start()


@pytest.fixture(scope="module")
def es256_facilitator(anvil) -> Iterator[FacilitatorServer]:
    server = _facilitator(anvil, EC_KEY.public_key())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def eddsa_facilitator(anvil) -> Iterator[FacilitatorServer]:
    server = _facilitator(anvil, ED_KEY.public_key())
    try:
        yield server
    finally:
        server.stop()


def _key_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "facilitator_api_key_secret"
    path.write_text(text)
    path.chmod(0o600)
    return path


def _refusals(server: FacilitatorServer) -> list[str]:
    return [body["reason"] for body in server.stats.received("unauthorized")]


async def test_es256_jwt_on_supported_verify_and_settle(
    es256_facilitator, usdc, upto_payer, seller, tmp_path, caplog
):
    # upto asks GET /supported at start; its payment is then verified and settled: all three
    # calls carry a fresh token naming that call, or the facilitator refuses it.
    caplog.set_level(logging.DEBUG)
    before = len(_refusals(es256_facilitator))
    calls = {e: es256_facilitator.stats.calls(e) for e in ("supported", "verify", "settle")}
    async with (
        paid_stack(
            seller=seller,
            facilitator_url=es256_facilitator.url,
            ledger=tmp_path / "payments.db",
            facilitator_auth="cdp-jwt",
            facilitator_api_key_id=KEY_ID,
            facilitator_api_key_secret_file=_key_file(tmp_path, _ec_pem()),
            **upto_settings(payment_schemes=["upto"]),
        ) as stack,
        sdk_upto_client(upto_payer) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
        assert receipt_header(response.headers)["success"] is True
    for endpoint, count in calls.items():
        assert es256_facilitator.stats.calls(endpoint) > count, endpoint
    assert _refusals(es256_facilitator)[before:] == []
    assert usdc.balance_of(seller) == charge(1, 4)
    assert "BEGIN EC PRIVATE KEY" not in caplog.text
    assert "Bearer" not in caplog.text


async def test_eddsa_jwt_pays_exact(eddsa_facilitator, usdc, payer, seller, tmp_path):
    before = len(_refusals(eddsa_facilitator))
    async with paid_stack(
        seller=seller,
        facilitator_url=eddsa_facilitator.url,
        ledger=tmp_path / "payments.db",
        facilitator_auth="cdp-jwt",
        facilitator_api_key_id=KEY_ID,
        facilitator_api_key_secret_file=_key_file(tmp_path, _ed_base64()),
    ) as stack:
        status, headers, body = await post(stack, await v2_header(stack, payer))
        assert status == 200, body
        assert receipt_of(headers)["success"] is True
    assert _refusals(eddsa_facilitator)[before:] == []
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_without_a_token_the_facilitator_refuses_and_nothing_is_served(
    es256_facilitator, payer, seller, tmp_path
):
    before = len(_refusals(es256_facilitator))
    async with paid_stack(
        seller=seller, facilitator_url=es256_facilitator.url, ledger=tmp_path / "payments.db"
    ) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, payer))
        assert status == 503  # the verifier is unusable: never an unpaid reply
        assert headers["X-Paygate-Error"] == "payment_verifier_unavailable"
        assert stack.fake.hits["POST /v1/chat/completions"] == 0
    assert set(_refusals(es256_facilitator)[before:]) == {"missing_token"}


async def test_the_stand_in_refuses_expired_misaddressed_and_foreign_tokens(es256_facilitator):
    url = es256_facilitator.url
    secret = SecretStr(_ec_pem())
    fresh = CdpJwt(KEY_ID, secret)
    expired = CdpJwt(KEY_ID, secret, clock=lambda: time.time() - 600)
    future = CdpJwt(KEY_ID, secret, clock=lambda: time.time() + 600)
    stranger = CdpJwt(KEY_ID, SecretStr(_ed_base64()))  # right id, another key
    cases = [
        ("expired_token", expired.headers("GET", url + "/supported")),
        ("token_not_yet_valid", future.headers("GET", url + "/supported")),
        ("wrong_uri", fresh.headers("GET", url + "/verify")),  # a token for another call
        ("invalid_token", stranger.headers("GET", url + "/supported")),
    ]
    async with aiohttp.ClientSession() as session:
        for reason, headers in cases:
            async with session.get(url + "/supported", headers=headers) as response:
                assert response.status == 401, reason
                assert (await response.json())["reason"] == reason
        async with session.get(
            url + "/supported", headers=fresh.headers("GET", url + "/supported")
        ) as response:
            assert response.status == 200


@pytest.mark.parametrize(
    ("key_id", "secret", "reason"),
    [
        (KEY_ID, None, "needs facilitator_api_key_id and facilitator_api_key_secret_file"),
        (None, "pem", "needs facilitator_api_key_id"),
        (KEY_ID, "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n", "PEM"),
        (KEY_ID, base64.b64encode(b"k" * 40).decode(), "64 bytes"),
        (KEY_ID, "not a key at all !!", "neither PEM nor base64"),
    ],
)
def test_a_bad_jwt_key_stops_the_start_without_quoting_it(tmp_path, key_id, secret, reason):
    text = _ec_pem() if secret == "pem" else secret
    settings = load_settings(
        None,
        facilitator_auth="cdp-jwt",
        facilitator_api_key_id=key_id,
        facilitator_api_key_secret_file=_key_file(tmp_path, text) if text else None,
    )
    with pytest.raises(ConfigError) as caught:
        settings.facilitator_auth_provider()
    assert reason in str(caught.value)
    if text:
        assert text.strip() not in str(caught.value)


def test_a_jwt_key_without_the_jwt_mode_is_refused(tmp_path):
    # A key configured but not used would send calls without the token the operator meant.
    settings = load_settings(None, facilitator_api_key_id=KEY_ID)
    with pytest.raises(ConfigError, match="cdp-jwt only"):
        settings.facilitator_auth_provider()


def test_the_jwt_key_is_redacted_from_logs(tmp_path):
    pem = _ec_pem()
    settings = load_settings(
        None,
        facilitator_auth="cdp-jwt",
        facilitator_api_key_id=KEY_ID,
        facilitator_api_key_secret_file=_key_file(tmp_path, pem),
    )
    secrets = settings.log_secrets()
    body = [line for line in pem.splitlines() if not line.startswith("-----")]
    assert all(line in secrets for line in body if len(line) >= 16)
