"""The gateway's connections to the SDK facilitator: over TLS on a private CA (verified, kept,
paid through), and a facilitator that goes away under a kept connection and comes back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.gateway_support import eventually
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_stack, post, receipt_of, v2_header
from tests.fixtures.tls import TlsFront, make_ca


async def test_payments_verify_and_settle_over_one_kept_tls_connection(
    facilitator: Any,
    usdc: Any,
    payer: Any,
    seller: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = make_ca(tmp_path / "ca")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))  # how an operator trusts a private CA
    verified, settled = facilitator.stats.verify_calls, facilitator.stats.settle_calls
    with TlsFront(ca, facilitator.port) as front:
        async with paid_stack(
            seller=seller, facilitator_url=front.url, ledger=tmp_path / "payments.db"
        ) as stack:
            for _ in range(3):
                status, headers, body = await post(stack, await v2_header(stack, payer))
                assert status == 200, body
                assert receipt_of(headers)["success"] is True
        # Six calls; a settlement after a reply may overlap the next verification.
        assert 1 <= front.connections <= 2
    assert facilitator.stats.verify_calls - verified == 3
    assert facilitator.stats.settle_calls - settled == 3
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


async def test_an_untrusted_certificate_is_refused_and_nothing_is_served(
    facilitator: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca")  # the gateway trusts the system store only
    verified = facilitator.stats.verify_calls
    with TlsFront(ca, facilitator.port) as front:
        async with paid_stack(
            seller=seller, facilitator_url=front.url, ledger=tmp_path / "payments.db"
        ) as stack:
            status, headers, _ = await post(stack, await v2_header(stack, payer))
            assert status == 503
            assert headers["X-Paygate-Error"] == "payment_verifier_unavailable"
            assert stack.fake.hits["POST /v1/chat/completions"] == 0
    assert facilitator.stats.verify_calls == verified


async def test_a_facilitator_gone_under_a_kept_connection_refuses_cleanly_then_pays_again(
    facilitator: Any, usdc: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "payments.db"
    ) as stack:
        status, _, body = await post(stack, await v2_header(stack, payer))
        assert status == 200, body
        # Its settlement (after the reply) is done before the facilitator goes.
        await eventually(lambda: usdc.balance_of(seller) == PRICE_ATOMIC, timeout=10)
        facilitator.down()  # drops the kept connection and stops listening
        try:
            status, headers, _ = await post(stack, await v2_header(stack, payer))
            assert status == 503
            assert headers["X-Paygate-Error"] == "payment_verifier_unavailable"
        finally:
            facilitator.up()
        status, headers, body = await post(stack, await v2_header(stack, payer))
        assert status == 200, body
        assert receipt_of(headers)["success"] is True
        assert stack.fake.hits["POST /v1/chat/completions"] == 2  # the refused one never ran
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
