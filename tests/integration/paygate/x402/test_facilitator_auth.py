"""Facilitator authentication: the operator's headers (a hosted facilitator's API key) reach
every facilitator call, from a secret file or the systemd credential, and never a log line."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from paygate_dev.chain.accounts import FACILITATOR
from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings

from paygate.config import ConfigError, load_settings
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

API_KEY = "fk_live_6c1d0f7be2a94c51"


@pytest.fixture(scope="module")
def locked_facilitator(anvil) -> Iterator[FacilitatorServer]:
    """The SDK facilitator that answers 401 unless the call carries ``X-Api-Key``."""
    settings = FacilitatorSettings(
        rpc_url=anvil.rpc_url,
        private_key=anvil.accounts[FACILITATOR].key,
        required_headers=(("X-Api-Key", API_KEY), ("X-Tenant", "paygate-tests")),
    )
    server = FacilitatorServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


async def test_headers_file_authenticates_every_call_and_stays_out_of_logs(
    locked_facilitator, usdc, payer, seller, tmp_path, caplog
):
    headers = tmp_path / "facilitator_headers"
    headers.write_text(f"# hosted facilitator\nX-Api-Key: {API_KEY}\n\nX-Tenant: paygate-tests\n")
    headers.chmod(0o600)
    caplog.set_level(logging.DEBUG)
    async with paid_stack(
        seller=seller,
        facilitator_url=locked_facilitator.url,
        ledger=tmp_path / "payments.db",
        facilitator_headers_file=headers,
    ) as stack:
        status, reply_headers, body = await post(stack, await v2_header(stack, payer))
        assert status == 200, body
        assert receipt_of(reply_headers)["success"] is True
    assert locked_facilitator.stats.verify_calls == 1
    assert locked_facilitator.stats.settle_calls == 1
    assert locked_facilitator.stats.calls("unauthorized") == 0
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert API_KEY not in caplog.text


async def test_upto_starts_and_settles_behind_an_authenticated_facilitator(
    locked_facilitator, usdc, upto_payer, seller, tmp_path
):
    # upto asks the facilitator's GET /supported at start for the address that may settle:
    # that call carries the operator's headers like /verify and /settle, or upto cannot start.
    headers = tmp_path / "facilitator_headers"
    headers.write_text(f"X-Api-Key: {API_KEY}\nX-Tenant: paygate-tests\n")
    headers.chmod(0o600)
    before = locked_facilitator.stats.calls("unauthorized")
    async with (
        paid_stack(
            seller=seller,
            facilitator_url=locked_facilitator.url,
            ledger=tmp_path / "payments.db",
            facilitator_headers_file=headers,
            **upto_settings(payment_schemes=["upto"]),
        ) as stack,
        sdk_upto_client(upto_payer) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
        receipt = receipt_header(response.headers)
    assert locked_facilitator.stats.calls("supported") >= 1
    assert locked_facilitator.stats.calls("unauthorized") == before
    assert receipt["success"] is True
    assert usdc.balance_of(seller) == charge(1, 4)


async def test_credentials_directory_is_read_when_no_file_setting(
    locked_facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "facilitator_headers").write_text(
        f"X-Api-Key: {API_KEY}\nX-Tenant: paygate-tests\n"
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    async with paid_stack(
        seller=seller, facilitator_url=locked_facilitator.url, ledger=tmp_path / "payments.db"
    ) as stack:
        status, _, body = await post(stack, await v2_header(stack, payer))
        assert status == 200, body
    assert locked_facilitator.stats.calls("unauthorized") == 0
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_without_headers_the_facilitator_refuses_and_nothing_is_served(
    locked_facilitator, payer, seller, tmp_path
):
    async with paid_stack(
        seller=seller, facilitator_url=locked_facilitator.url, ledger=tmp_path / "payments.db"
    ) as stack:
        status, _, _ = await post(stack, await v2_header(stack, payer))
        assert status == 503  # the verifier is unusable: never an unpaid reply
        assert stack.fake.hits["POST /v1/chat/completions"] == 0
    assert locked_facilitator.stats.calls("unauthorized") >= 1


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (f"X-Api-Key {API_KEY}\n", "line 1: want 'Name: value'"),
        (f"# c\nBad Name: {API_KEY}\n", "line 2: want 'Name: value'"),
        (f"Content-Length: {API_KEY}\n", "line 1: Content-Length is set by the gateway"),
        ("X-Api-Key:\n", "line 1: want 'Name: value'"),
    ],
)
def test_malformed_headers_file_is_refused_without_quoting_it(tmp_path, text, reason):
    path = tmp_path / "headers"
    path.write_text(text)
    settings = load_settings(None, facilitator_headers_file=path)
    with pytest.raises(ConfigError) as caught:
        settings.facilitator_headers()
    assert reason in str(caught.value)
    assert API_KEY not in str(caught.value)


def test_unreadable_headers_file_is_a_config_error(tmp_path):
    settings = load_settings(None, facilitator_headers_file=tmp_path / "missing")
    with pytest.raises(ConfigError, match="cannot read the facilitator_headers secret file"):
        settings.facilitator_headers()
