"""A client that verifies the appliance pays through a `batch-settlement` channel, and a
middlebox cannot steer its deposit.

The real gateway on a TPM key (swtpm, EK certificates from a local CA) in chain mode on anvil
(Circle's FiatToken as USDC, the x402BatchSettlement stand-in at its canonical address, the gas
key the channels' receiver authorizer) attests its channel terms in the binding document the
TPM quotes. The client (the paygate transport with an AttestationPolicy and a channel deposit)
pays through one channel; a real reverse proxy on 127.0.0.1 rewrites one field of the 402's
channel offer (receiver, receiverAuthorizer, token, chain, withdraw delay, deposit method,
amount), and the client refuses each with its own code before anything is signed: nothing
reaches the gateway, no deposit moves. A gateway whose attested terms carry no channel terms (a
release before them) is paid by its exact offer, or refused cleanly when it offers channels
alone. The chain is the proof.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.stack import Swtpm

import paygate.server.app as gateway_app
from enclave.keys.tpm import TpmKey
from paygate import wire
from paygate.client import AsyncPaygateTransport, AttestationPolicy, ClientError, SpendPolicy
from paygate.x402.schemes.batch_settlement import channel as ch
from tests.fixtures.batch_settlement_support import chain_batch, claimer
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC
from tests.fixtures.payterms_support import (
    ATTACKER,
    OTHER_TOKEN,
    Edit,
    PayTermsProxy,
    double,
    rewrite_402,
    set_field,
)
from tests.fixtures.swtpm import EkCa

DEPOSIT_ATOMIC = 20 * PRICE_ATOMIC
CORRECTIVE = "invalid_batch_settlement_evm_cumulative_amount_mismatch"

# The channel offer's field → (the rewrite, the refusal's code).
CASES: dict[str, tuple[Edit, str]] = {
    "receiver": (set_field("payTo", ATTACKER), "offer_pay_to_mismatch"),
    "receiverAuthorizer": (
        set_field("extra.receiverAuthorizer", ATTACKER),
        "offer_receiver_authorizer_mismatch",
    ),
    "asset": (set_field("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    "chain": (set_field("network", "eip155:8453"), "offer_network_mismatch"),
    "withdrawDelay-longer": (
        set_field("extra.withdrawDelay", str(ch.MAX_WITHDRAW_DELAY)),
        "offer_withdraw_delay_mismatch",
    ),
    "withdrawDelay-shorter": (
        set_field("extra.withdrawDelay", str(ch.MIN_WITHDRAW_DELAY + 1)),
        "offer_withdraw_delay_mismatch",
    ),
    "assetTransferMethod": (
        set_field("extra.assetTransferMethod", "permit2"),
        "offer_channel_contract_mismatch",
    ),
    "amount": (double("amount"), "offer_price_mismatch"),
}


def spend() -> SpendPolicy:
    return SpendPolicy(
        max_per_request="0.01",
        max_total="0.05",
        networks=["base-sepolia"],
        channel_deposit="0.02",
    )


def policy(ek_ca: EkCa, seller: str) -> AttestationPolicy:
    return AttestationPolicy.from_files(ek_ca.chain_pem, pay_to=seller)


@pytest.fixture(scope="module")
def module_seller() -> str:
    from paygate_dev.chain.accounts import new_account

    return new_account().address


def _tpm_key(factory: Callable[[EkCa], Swtpm], ca: EkCa, directory: Path) -> Iterator[TpmKey]:
    # One TPM per gateway configuration: each measures its own configuration into PCR 23.
    with TpmKey.generate(factory(ca).tcti, directory / "key") as key:
        yield key


def _tpm_keys(
    factory: Callable[[EkCa], Swtpm], ca: EkCa, tmp_path_factory: Any, *names: str
) -> Iterator[dict[str, TpmKey]]:
    """A TPM key per name (each its own TPM), closed when the caller is done with them."""
    generators = {name: _tpm_key(factory, ca, tmp_path_factory.mktemp(name)) for name in names}
    yield {name: next(generator) for name, generator in generators.items()}
    for generator in generators.values():
        next(generator, None)


@pytest.fixture(scope="module")
def channel_key(ek_swtpm_factory: Any, ek_ca: EkCa, tmp_path_factory: Any) -> Iterator[TpmKey]:
    yield from _tpm_key(ek_swtpm_factory, ek_ca, tmp_path_factory.mktemp("channels"))


def gateway(seller: str, ledger: Path, anvil: Any, gas_key: Any, key: TpmKey, **more: Any) -> Any:
    return chain_batch(
        seller,
        ledger,
        anvil,
        gas_key,
        key=key,
        key_backend="tpm",
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
        **more,
    )


def book_of(transport: AsyncPaygateTransport) -> list[Any]:
    payer = transport._core.payer
    assert payer is not None
    assert payer.channels is not None
    return payer.channels.channels()


async def test_a_verifying_client_pays_three_requests_through_one_channel(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, channel_key, tmp_path
):
    ledger = tmp_path / "payments.db"
    escrow = usdc.balance_of(ch.SETTLEMENT_ADDRESS)
    seller_before = usdc.balance_of(module_seller)
    transport = AsyncPaygateTransport(
        wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
    )
    async with (
        gateway(module_seller, ledger, anvil, gas_key, channel_key) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        for _ in range(3):
            reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"]  # the sealed reply opened
        # The TPM quoted a binding document that names the channel terms.
        attested = transport.attested(stack.url)
        assert attested is not None
        assert attested.kind == "tpm"
        assert any(c.name == "quote" and c.ok for c in attested.checks)
        assert attested.binding.payment is not None
        (terms,) = attested.binding.payment.channels
        assert (terms.network, terms.receiver, terms.receiver_authorizer) == (
            "eip155:84532",
            module_seller,
            gas_key.address,
        )
        assert (terms.contract, terms.withdraw_delay) == (ch.SETTLEMENT_ADDRESS, 900)
        records = transport.payments
        assert [r.scheme for r in records] == ["batch-settlement"] * 3
        assert [r.deposit for r in records] == [Decimal("0.02"), Decimal(0), Decimal(0)]
        assert [(r.settled, r.receipt_error) for r in records] == [(True, None)] * 3
        (channel,) = book_of(transport)  # one channel, opened on the attested terms
        assert channel.payer.config.receiver_authorizer == gas_key.address
        assert channel.payer.config.receiver == module_seller
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - DEPOSIT_ATOMIC
        assert usdc.balance_of(ch.SETTLEMENT_ADDRESS) == escrow + DEPOSIT_ATOMIC
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert usdc.balance_of(module_seller) == seller_before + 3 * PRICE_ATOMIC


@pytest.mark.parametrize("field", list(CASES))
async def test_a_rewritten_channel_offer_is_refused_before_anything_is_signed(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, channel_key, tmp_path, field
):
    edit, code = CASES[field]
    escrow = usdc.balance_of(ch.SETTLEMENT_ADDRESS)
    seller_before = usdc.balance_of(module_seller)
    transport = AsyncPaygateTransport(
        wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
    )
    async with gateway(module_seller, tmp_path / "l.db", anvil, gas_key, channel_key) as stack:
        served = sum(stack.fake.hits.values())
        with PayTermsProxy(stack.url, rewrite_402(2, edit)) as proxy:
            async with httpx.AsyncClient(transport=transport, timeout=60) as http:
                with pytest.raises(ClientError) as caught:
                    await http.post(proxy.url + CHAT, json=CHAT_BODY)
            assert caught.value.code == code, str(caught.value)
            assert proxy.rewritten == 1  # the 402 really passed through the rewrite
            assert proxy.payments_sent == 0  # no voucher, no deposit authorization left us
            assert transport.attested(proxy.url) is not None  # attestation itself passed
        assert sum(stack.fake.hits.values()) == served
    assert transport.payments == []
    assert transport.spent == 0
    assert book_of(transport) == []  # no channel opened
    assert usdc.balance_of(payer.address) == PAYER_FUNDS
    assert usdc.balance_of(ch.SETTLEMENT_ADDRESS) == escrow  # nothing deposited
    assert usdc.balance_of(module_seller) == seller_before
    assert usdc.balance_of(ATTACKER) == 0


class CorrectiveRewrite:
    """Rewrites the corrective 402s (the ones that carry the channel's state) once ``hostile``."""

    def __init__(self, edit: Edit) -> None:
        self.edit = edit
        self.hostile = False
        self.rewritten = 0

    def __call__(self, headers: dict[str, str], body: bytes) -> bytes:
        name = next(k for k in headers if k.lower() == wire.PAYMENT_REQUIRED.lower())
        document = json.loads(base64.b64decode(headers[name]))
        if self.hostile and document.get("error") == CORRECTIVE:
            for offer in document["accepts"]:
                self.edit(offer)
            headers[name] = base64.b64encode(json.dumps(document).encode()).decode()
            self.rewritten += 1
        return body


async def test_the_corrective_402_is_held_to_the_attested_terms_too(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, channel_key, tmp_path
):
    """A lost receipt leaves our count behind the seller's: its corrective 402 is taken when
    within the attested terms (the request is paid on the seller's state), and refused when a
    middlebox raises the next voucher's price in it — nothing more signed."""
    ledger = tmp_path / "payments.db"
    transport = AsyncPaygateTransport(
        wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
    )
    rewrite = CorrectiveRewrite(double("amount"))
    async with gateway(module_seller, ledger, anvil, gas_key, channel_key) as stack:
        with PayTermsProxy(stack.url, rewrite) as proxy:
            async with httpx.AsyncClient(transport=transport, timeout=60) as http:
                for _ in range(2):
                    reply = await http.post(proxy.url + CHAT, json=CHAT_BODY)
                    assert reply.status_code == 200, reply.text
                (channel,) = book_of(transport)
                channel.payer.charged -= PRICE_ATOMIC  # as if the second receipt were lost
                reply = await http.post(proxy.url + CHAT, json=CHAT_BODY)  # resynchronised
                assert reply.status_code == 200, reply.text
                assert channel.payer.charged == channel.signed == 3 * PRICE_ATOMIC

                rewrite.hostile = True
                channel.payer.charged -= PRICE_ATOMIC  # lost again
                sent = proxy.payments_sent
                with pytest.raises(ClientError) as caught:
                    await http.post(proxy.url + CHAT, json=CHAT_BODY)
                assert caught.value.code == "offer_price_mismatch"
                assert rewrite.rewritten == 1
                assert proxy.payments_sent == sent + 1  # the stale voucher only, none after
                # Nothing signed past the stale voucher; the channel is free again.
                assert channel.signed == 3 * PRICE_ATOMIC
                assert channel.held_until == 0.0
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert next(r.deposit for r in transport.payments) == Decimal("0.02")
    assert all(r.deposit == 0 for r in transport.payments[1:])  # one deposit in all


@pytest.fixture(scope="module")
def older_keys(
    ek_swtpm_factory: Any, ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[dict[str, TpmKey]]:
    yield from _tpm_keys(ek_swtpm_factory, ek_ca, tmp_path_factory, "exact", "channels-only")


@pytest.fixture
def older_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway as released before channel terms were attested: it lists batch-settlement
    among its schemes but binds no channel terms (the same code with that one step left out)."""
    monkeypatch.setattr(gateway_app, "offered_channels", lambda processor: ())


async def test_an_older_gateway_is_paid_by_its_exact_offer_instead(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, older_keys, older_gateway, tmp_path
):
    escrow = usdc.balance_of(ch.SETTLEMENT_ADDRESS)
    seller_before = usdc.balance_of(module_seller)
    transport = AsyncPaygateTransport(
        wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
    )
    async with (
        gateway(
            module_seller,
            tmp_path / "l.db",
            anvil,
            gas_key,
            older_keys["exact"],
            payment_schemes=["exact", "batch-settlement"],
        ) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
        assert reply.status_code == 200, reply.text
        attested = transport.attested(stack.url)
        assert attested is not None
        assert attested.binding.payment is not None
        assert "batch-settlement" in attested.binding.payment.schemes
        assert attested.binding.payment.channels == ()
    (record,) = transport.payments
    assert (record.scheme, record.settled, record.deposit) == ("exact", True, None)
    assert book_of(transport) == []
    assert usdc.balance_of(ch.SETTLEMENT_ADDRESS) == escrow
    assert usdc.balance_of(module_seller) == seller_before + PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC


async def test_an_older_gateway_offering_channels_alone_is_refused_cleanly(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, older_keys, older_gateway, tmp_path
):
    escrow = usdc.balance_of(ch.SETTLEMENT_ADDRESS)
    transport = AsyncPaygateTransport(
        wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
    )
    async with gateway(
        module_seller, tmp_path / "l.db", anvil, gas_key, older_keys["channels-only"]
    ) as stack:
        with PayTermsProxy(stack.url, None) as proxy:
            async with httpx.AsyncClient(transport=transport, timeout=60) as http:
                with pytest.raises(ClientError) as caught:
                    await http.post(proxy.url + CHAT, json=CHAT_BODY)
            assert caught.value.code == "offer_channel_not_attested"
            assert proxy.payments_sent == 0
    assert transport.payments == []
    assert book_of(transport) == []
    assert usdc.balance_of(ch.SETTLEMENT_ADDRESS) == escrow
    assert usdc.balance_of(payer.address) == PAYER_FUNDS


@pytest.fixture(scope="module")
def more_keys(
    ek_swtpm_factory: Any, ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[dict[str, TpmKey]]:
    yield from _tpm_keys(ek_swtpm_factory, ek_ca, tmp_path_factory, "facilitator", "metered")


async def test_in_facilitator_mode_the_facilitators_authorizer_is_attested_and_paid(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, more_keys, facilitator, tmp_path
):
    """The receiver authorizer is the facilitator's (its GET /supported, read at start), not
    the gateway's own key: the attested terms name it, and a rewrite to another is refused."""
    from paygate_dev.chain.accounts import FACILITATOR

    ledger = tmp_path / "payments.db"
    mode = {"payment_mode": "facilitator", "facilitator_url": facilitator.url}
    transport = AsyncPaygateTransport(
        wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
    )
    async with (
        gateway(module_seller, ledger, anvil, gas_key, more_keys["facilitator"], **mode) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        for _ in range(3):
            reply = await http.post(stack.url + CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
        attested = transport.attested(stack.url)
        assert attested is not None
        assert attested.binding.payment is not None
        (terms,) = attested.binding.payment.channels
        assert terms.receiver_authorizer == anvil.accounts[FACILITATOR].address
        assert [r.deposit for r in transport.payments] == [Decimal("0.02"), 0, 0]
        edit, code = CASES["receiverAuthorizer"]
        other = AsyncPaygateTransport(
            wallet=payer, spend=spend(), attestation=policy(ek_ca, module_seller)
        )
        with PayTermsProxy(stack.url, rewrite_402(2, edit)) as proxy:
            async with httpx.AsyncClient(transport=other, timeout=60) as hostile:
                with pytest.raises(ClientError) as caught:
                    await hostile.post(proxy.url + CHAT, json=CHAT_BODY)
            assert caught.value.code == code
            assert proxy.payments_sent == 0
        assert other.payments == []
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - DEPOSIT_ATOMIC


async def test_a_metered_route_pays_its_maximum_held_to_the_attested_token_prices(
    anvil, usdc, payer, gas_key, ek_ca, module_seller, more_keys, tmp_path
):
    """With token prices the channel offer states the request's maximum (batch-settlement alone
    attests the token prices and cap for it); each receipt charges the usage, less."""
    from tests.fixtures.upto_support import CAP, TOKEN_PRICES, charge

    ledger = tmp_path / "payments.db"
    seller_before = usdc.balance_of(module_seller)
    metered = {"token_prices": TOKEN_PRICES, "max_tokens_cap": CAP}
    wide = SpendPolicy(
        max_per_request="0.1", max_total="1", networks=["base-sepolia"], channel_deposit="0.5"
    )
    transport = AsyncPaygateTransport(
        wallet=payer, spend=wide, attestation=policy(ek_ca, module_seller)
    )
    async with (
        gateway(module_seller, ledger, anvil, gas_key, more_keys["metered"], **metered) as stack,
        httpx.AsyncClient(transport=transport, timeout=60) as http,
    ):
        for chunks in (3, 5):
            body = {**CHAT_BODY, "fake": {"chunks": chunks}}
            reply = await http.post(stack.url + CHAT, json=body)
            assert reply.status_code == 200, reply.text
        attested = transport.attested(stack.url)
        assert attested is not None
        assert attested.binding.payment is not None
        assert attested.binding.payment.token_prices
        assert attested.binding.payment.max_tokens_cap == CAP
        records = transport.payments
        assert [(r.settled, r.receipt_error) for r in records] == [(True, None)] * 2
        assert all(r.amount_atomic > charge(1, 5) for r in records)  # the maxima offered
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claim_once() == 1
    assert usdc.balance_of(module_seller) == seller_before + charge(1, 3) + charge(1, 5)


async def test_attest_show_states_the_channel_terms_the_running_gateway_binds(
    anvil, usdc, gas_key, module_seller, tmp_path
):
    """An operator pins what ``attest show`` prints (the payment terms, the configuration
    digest, PCR 23) before the gateway runs: in chain mode its channel terms (the gas key the
    receiver authorizer) are the ones the running gateway binds, not left out."""
    from paygate.cli.attest_live import show_facts
    from tests.fixtures.batch_settlement_support import chain_batch

    async with chain_batch(module_seller, tmp_path / "l.db", anvil, gas_key) as stack:
        nonce = "00" * 32
        async with stack.client.get(f"{stack.url}/v1/attestation?nonce={nonce}") as answer:
            assert answer.status == 200, await answer.text()
            served = (await answer.json())["binding"]["payment"]
        facts = show_facts(stack.settings, stack.key)
    assert served["channels"], served  # the gateway binds channel terms
    assert facts["payment"] == served
    (terms,) = facts["payment"]["channels"]
    assert gas_key.address in terms.values()
