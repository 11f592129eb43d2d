"""Chain mode, batched (paygate.x402.schemes.exact.multicall): exact settlements sent together in
one Multicall3 ``aggregate3`` transaction, on anvil with Circle's FiatToken V2.2 and payments
signed by the official x402 SDK's client. Each payment is proven by its own logs; a bad
authorization fails alone; the attacks a batch invites (a forged or duplicated authorization,
another token's look-alike logs in the same receipt, a payer front-running one authorization) are
refused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from eth_account import Account
from paygate_dev.chain.accounts import SPARE
from pydantic import SecretStr
from web3 import Web3

from paygate.x402 import codec, smartwallet
from paygate.x402.chain import ChainSettler
from paygate.x402.models import AnyPaymentPayload, SettleResponse
from paygate.x402.schemes.exact.multicall import DUPLICATE_IN_BATCH, proven_each
from paygate.x402.schemes.exact.transfer import CANCELED, TransferFacts
from paygate.x402.settler import SettlementSubject, SettlerUnavailable
from tests.fixtures.chain import sign_v2_payment

PRICE = 1000


def settler(anvil: Any, gas_key: Any, **kw: Any) -> ChainSettler:
    return ChainSettler(
        anvil.rpc_url,
        SecretStr(gas_key.key),
        timeout=5.0,
        settle_timeout=kw.pop("settle_timeout", 10.0),
        batch_window=kw.pop("batch_window", 0.3),
        batch_max=kw.pop("batch_max", 20),
        **kw,
    )


def pay(
    payer: Any, requirements: dict[str, Any], *, value: int | None = None
) -> tuple[AnyPaymentPayload, dict[str, Any]]:
    """An SDK-signed payment; ``value``: its amount changed after signing (a forgery)."""
    signed = sign_v2_payment(payer, requirements)
    if value is not None:
        signed["payload"]["authorization"]["value"] = str(value)
    return codec.parse_payment(signed, header="test"), requirements


def resign(
    payment: AnyPaymentPayload, signer: Any, *, token: str, name: str, chain_id: int, **changes: Any
) -> AnyPaymentPayload:
    """``payment``'s authorization (with ``changes``) signed by ``signer`` for ``token``."""
    auth = payment.payload.authorization
    message = {
        "from": auth.from_,
        "to": auth.to,
        "value": int(changes.get("value", auth.value)),
        "validAfter": int(auth.valid_after),
        "validBefore": int(auth.valid_before),
        "nonce": bytes.fromhex(auth.nonce[2:]),
    }
    signed = signer.sign_typed_data(
        domain_data={
            "name": name,
            "version": "2",
            "chainId": chain_id,
            "verifyingContract": Web3.to_checksum_address(token),
        },
        message_types={
            "TransferWithAuthorization": [
                {"name": "from", "type": "address"},
                {"name": "to", "type": "address"},
                {"name": "value", "type": "uint256"},
                {"name": "validAfter", "type": "uint256"},
                {"name": "validBefore", "type": "uint256"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        message_data=message,
    )
    data = payment.model_dump(mode="json", by_alias=True, exclude_none=True)
    data["payload"]["signature"] = "0x" + bytes(signed.signature).hex()
    data["payload"]["authorization"]["value"] = str(message["value"])
    return codec.parse_payment(data, header="test")


async def settle_all(
    chain: ChainSettler, payments: list[tuple[AnyPaymentPayload, dict[str, Any]]]
) -> list[SettleResponse]:
    return list(await asyncio.gather(*(chain.settle(p, r) for p, r in payments)))


def funded(anvil: Any, atomic: int = 10**9, token: str | None = None) -> Any:
    account = Account.create()
    if token is None:
        anvil.mint(account.address, atomic)
    else:
        anvil.mint(account.address, atomic, token)
    return account


def nonce_of(payment: AnyPaymentPayload) -> str:
    return payment.payload.authorization.nonce


async def test_a_batch_settles_each_payment_in_one_transaction_with_its_own_proof(
    anvil, usdc, seller, gas_key
):
    payers = [funded(anvil) for _ in range(3)]
    # Two payments of one payer to one seller: same (from, to), different amounts and nonces.
    amounts = [PRICE, 2 * PRICE, 3 * PRICE, 5 * PRICE, 7 * PRICE]
    owners = [payers[0], payers[0], payers[1], payers[2], payers[1]]
    payments = [
        pay(owner, usdc.requirements_v2(seller, amount))
        for owner, amount in zip(owners, amounts, strict=True)
    ]
    chain = settler(anvil, gas_key)
    try:
        answers = await settle_all(chain, payments)
    finally:
        await chain.close()
    assert [a.success for a in answers] == [True] * 5
    (tx_hash,) = {a.transaction for a in answers}  # one transaction for all five
    assert [a.amount for a in answers] == [str(x) for x in amounts]
    receipt = anvil.w3.eth.get_transaction_receipt(tx_hash)
    assert receipt["to"] == smartwallet.MULTICALL3_ADDRESS
    facts = [TransferFacts.of(p, r) for p, r in payments]
    assert proven_each(receipt, facts) == [True] * 5
    assert usdc.balance_of(seller) == sum(amounts)
    for payment, _ in payments:
        assert usdc.authorization_state(payment.payload.authorization.from_, nonce_of(payment))


async def test_bad_authorizations_in_a_batch_fail_alone_and_the_rest_settle(
    anvil, usdc, seller, gas_key
):
    good = [pay(funded(anvil), usdc.requirements_v2(seller, PRICE)) for _ in range(3)]
    # Expired: valid for 5 s, then the chain's clock moves on a minute.
    expired = pay(funded(anvil), usdc.requirements_v2(seller, PRICE, max_timeout_seconds=5))
    # Cancelled by its payer before the batch: its nonce is used, with no transfer.
    canceller = funded(anvil)
    cancelled = pay(canceller, usdc.requirements_v2(seller, PRICE))
    anvil.cancel_authorization(canceller, nonce_of(cancelled[0]))
    # An empty wallet (signed correctly, nothing to move).
    empty = pay(Account.create(), usdc.requirements_v2(seller, PRICE))
    # Forged: a stranger's signature over a payer's authorization, and a raised amount.
    victim = funded(anvil)
    honest = pay(victim, usdc.requirements_v2(seller, PRICE))
    forged = (
        resign(
            honest[0],
            Account.create(),
            token=usdc.address,
            name=usdc.name,
            chain_id=anvil.chain_id,
        ),
        honest[1],
    )
    inflated = pay(victim, usdc.requirements_v2(seller, PRICE), value=100 * PRICE)
    anvil.rpc("evm_increaseTime", [60])
    anvil.mine()
    batch = [good[0], expired, cancelled, good[1], empty, forged, inflated, good[2]]
    chain = settler(anvil, gas_key)
    try:
        answers = await settle_all(chain, batch)
    finally:
        await chain.close()
    reasons = [a.error_reason for a in answers]
    assert reasons == [
        None,
        "invalid_exact_evm_payload_authorization_valid_before",
        CANCELED,
        None,
        "invalid_exact_evm_insufficient_balance",
        "invalid_exact_evm_payload_signature",
        "invalid_exact_evm_payload_signature",
        None,
    ]
    settled = [answers[0], answers[3], answers[7]]
    assert all(a.success for a in settled)
    assert len({a.transaction for a in settled}) == 1
    assert usdc.balance_of(seller) == 3 * PRICE
    assert usdc.balance_of(victim.address) == 10**9  # nothing taken by the forgeries


async def test_the_same_authorization_twice_in_one_batch_moves_money_once(
    anvil, usdc, seller, gas_key
):
    payment = pay(funded(anvil), usdc.requirements_v2(seller, PRICE))
    other = pay(funded(anvil), usdc.requirements_v2(seller, PRICE))
    chain = settler(anvil, gas_key)
    try:
        answers = await settle_all(chain, [payment, other, payment])
    finally:
        await chain.close()
    assert [a.success for a in answers] == [True, True, False]
    assert answers[2].error_reason == DUPLICATE_IN_BATCH  # one log proves one payment
    receipt = anvil.w3.eth.get_transaction_receipt(answers[0].transaction)
    used_topic = Web3.keccak(text="AuthorizationUsed(address,bytes32)")
    used = [e for e in receipt["logs"] if e["topics"][0] == used_topic]
    assert len(used) == 2
    assert usdc.balance_of(seller) == 2 * PRICE


def test_a_transfer_log_is_never_the_proof_of_two_payments(usdc, seller):
    # Sans-IO: two payments alike in all but their nonces; a receipt holding one
    # AuthorizationUsed per nonce but one Transfer proves only the one whose Transfer follows.
    payer = Account.create().address
    facts = [
        TransferFacts(usdc.address, payer, seller, PRICE, bytes([n]) * 32, usdc.network)
        for n in (1, 2)
    ]

    def topic(text: str) -> bytes:
        return bytes(Web3.keccak(text=text))

    def word(address: str) -> bytes:
        return bytes(12) + bytes.fromhex(address[2:])

    used = [
        {
            "address": usdc.address,
            "topics": [topic("AuthorizationUsed(address,bytes32)"), word(payer), f.nonce],
            "data": "0x",
        }
        for f in facts
    ]
    transfer = {
        "address": usdc.address,
        "topics": [topic("Transfer(address,address,uint256)"), word(payer), word(seller)],
        "data": "0x" + PRICE.to_bytes(32, "big").hex(),
    }
    receipt = {"status": 1, "logs": [used[0], used[1], transfer]}
    assert proven_each(receipt, facts) == [False, True]
    # The same Transfer after each AuthorizationUsed, but only one real transfer of each:
    assert proven_each({"status": 1, "logs": [used[0], transfer, used[1], transfer]}, facts) == [
        True,
        True,
    ]
    assert proven_each({"status": 0, "logs": [used[0], transfer]}, facts[:1]) == [False]
    # A Transfer to someone else, or of another amount, is no proof.
    wrong = {**transfer, "data": "0x" + (PRICE - 1).to_bytes(32, "big").hex()}
    assert proven_each({"status": 1, "logs": [used[0], wrong]}, facts[:1]) == [False]


@pytest.mark.parametrize("front_run", ["cancel", "transfer"])
async def test_a_payer_front_running_one_authorization_of_a_batch(
    anvil, usdc, seller, gas_key, front_run
):
    """Our batch waits in the mempool; the payer gets its own transaction (a cancel, or the
    authorization sent by someone else) mined first. Another token's look-alike logs (same
    payer, nonce, recipient and value, on a second FiatToken) ride in the same receipt."""
    other_token = anvil.deploy_fiat_token("Look-alike", "LOOK")
    payer = funded(anvil)
    anvil.mint(payer.address, 10**9, other_token)
    target = pay(payer, usdc.requirements_v2(seller, PRICE))
    lookalike = (
        resign(target[0], payer, token=other_token, name="Look-alike", chain_id=anvil.chain_id),
        {**target[1], "asset": other_token, "extra": {"name": "Look-alike", "version": "2"}},
    )
    rest = [pay(funded(anvil), usdc.requirements_v2(seller, PRICE)) for _ in range(2)]
    gas_address = Account.from_key(gas_key.key).address
    sent_before = anvil.w3.eth.get_transaction_count(gas_address, "pending")
    chain = settler(anvil, gas_key, settle_timeout=30.0)
    anvil.set_automine(False)
    try:
        settling = asyncio.ensure_future(settle_all(chain, [rest[0], target, lookalike, rest[1]]))
        async with asyncio.timeout(20):
            while anvil.w3.eth.get_transaction_count(gas_address, "pending") == sent_before:
                await asyncio.sleep(0.05)
        nonce = nonce_of(target[0])
        tip = {
            "from": anvil.accounts[SPARE].address,  # a relayer of the payer's
            "maxPriorityFeePerGas": 10**11,  # outbids our batch for the block's first place
            "maxFeePerGas": 10**12,
        }
        token = anvil.token()
        if front_run == "cancel":
            cancel = resign_cancel(payer, usdc, anvil.chain_id, nonce)
            front = token.get_function_by_signature("cancelAuthorization(address,bytes32,bytes)")(
                payer.address, bytes.fromhex(nonce[2:]), cancel
            ).transact(tip)
        else:
            auth = target[0].payload.authorization
            front = token.get_function_by_signature(
                "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
            )(
                payer.address,
                Web3.to_checksum_address(auth.to),
                int(auth.value),
                int(auth.valid_after),
                int(auth.valid_before),
                bytes.fromhex(nonce[2:]),
                bytes.fromhex(target[0].payload.signature[2:]),
            ).transact(tip)
        anvil.mine()
        async with asyncio.timeout(30):
            answers = await settling
    finally:
        anvil.set_automine(True)
        await chain.close()
    batch_tx = answers[0].transaction
    assert [answers[0].success, answers[2].success, answers[3].success] == [True] * 3
    assert {answers[0].transaction, answers[2].transaction, answers[3].transaction} == {batch_tx}
    # The batch's receipt holds the look-alike's AuthorizationUsed + Transfer for the same
    # payer, nonce, recipient and value — from the other token: no proof for USDC's payment.
    receipt = anvil.w3.eth.get_transaction_receipt(batch_tx)
    assert proven_each(receipt, [TransferFacts.of(*target)]) == [False]
    assert anvil.balance_of(seller, other_token) == PRICE
    if front_run == "cancel":
        assert answers[1].success is False
        assert answers[1].error_reason == CANCELED
        assert usdc.balance_of(seller) == 2 * PRICE
    else:  # the payer's own transaction paid the seller: settled, proven by that receipt
        assert answers[1].success is True
        assert answers[1].transaction == front.to_0x_hex()
        assert usdc.balance_of(seller) == 3 * PRICE


def resign_cancel(payer: Any, usdc: Any, chain_id: int, nonce: str) -> bytes:
    signed = payer.sign_typed_data(
        domain_data={
            "name": usdc.name,
            "version": "2",
            "chainId": chain_id,
            "verifyingContract": usdc.address,
        },
        message_types={
            "CancelAuthorization": [
                {"name": "authorizer", "type": "address"},
                {"name": "nonce", "type": "bytes32"},
            ]
        },
        message_data={"authorizer": payer.address, "nonce": bytes.fromhex(nonce[2:])},
    )
    return bytes(signed.signature)


async def test_batching_off_sends_one_transaction_per_payment(anvil, usdc, seller, gas_key):
    payments = [pay(funded(anvil), usdc.requirements_v2(seller, PRICE)) for _ in range(3)]
    chain = ChainSettler(anvil.rpc_url, SecretStr(gas_key.key), timeout=5.0, settle_timeout=10.0)
    for payment, requirements in payments:  # as the processor does: verify, then settle
        assert (await chain.verify(payment, requirements)).is_valid
    answers = await settle_all(chain, payments)
    assert all(a.success for a in answers)
    assert len({a.transaction for a in answers}) == 3
    for answer in answers:
        receipt = anvil.w3.eth.get_transaction_receipt(answer.transaction)
        assert receipt["to"] == usdc.address  # the token itself, no Multicall3
    assert usdc.balance_of(seller) == 3 * PRICE


@pytest.mark.parametrize("batch_max", [1, 20])
async def test_a_fresh_settler_settles_and_reconciles_with_no_verify_first(
    anvil, usdc, seller, gas_key, batch_max
):
    # After a restart a settler's first call may be a settlement or a reconciliation of an
    # owed payment, with no verify before it: it must learn which chain it is on (and never
    # sign for chain 0) first.
    owed = [pay(funded(anvil), usdc.requirements_v2(seller, PRICE * n)) for n in (1, 2)]
    answers = []
    for payment, requirements in owed:
        chain = settler(anvil, gas_key, batch_max=batch_max)  # a new process each time
        try:
            if not answers:
                answers.append(await chain.settle(payment, requirements))
            else:
                answers.append(await chain.reconcile(SettlementSubject(payment, requirements)))
        finally:
            await chain.close()
    assert [a.success for a in answers] == [True, True]
    for (payment, requirements), answer in zip(owed, answers, strict=True):
        receipt = anvil.w3.eth.get_transaction_receipt(answer.transaction)
        assert proven_each(receipt, [TransferFacts.of(payment, requirements)]) == [True]
    assert usdc.balance_of(seller) == 3 * PRICE


@pytest.mark.parametrize("batch_max", [1, 20])
async def test_a_settlement_for_another_chain_moves_nothing_and_sinks_no_other(
    anvil, usdc, seller, gas_key, batch_max
):
    # The endpoint serves anvil's chain; a payment owed on another offered network must not be
    # settled here (nor recorded as settled there): refused before anything is signed, and
    # alone — the payments batched beside it settle.
    payer = funded(anvil)
    payment, requirements = pay(payer, usdc.requirements_v2(seller, PRICE))
    elsewhere = (payment, {**requirements, "network": "eip155:8453"})
    good = [pay(funded(anvil), usdc.requirements_v2(seller, PRICE)) for _ in range(2)]
    chain = settler(anvil, gas_key, batch_max=batch_max)
    try:
        answers = await asyncio.gather(
            *(chain.settle(p, r) for p, r in (good[0], elsewhere, good[1])),
            return_exceptions=True,
        )
    finally:
        await chain.close()
    assert isinstance(answers[1], SettlerUnavailable)
    assert [answers[0].success, answers[2].success] == [True, True]
    if batch_max > 1:
        assert answers[0].transaction == answers[2].transaction
    assert usdc.balance_of(seller) == 2 * PRICE
    assert not usdc.authorization_state(payer.address, nonce_of(payment))


async def test_a_chain_without_multicall3_settles_one_by_one(anvil, usdc, seller, gas_key):
    from paygate_dev.chain.build import load_contract

    payments = [pay(funded(anvil), usdc.requirements_v2(seller, PRICE)) for _ in range(2)]
    anvil.set_code(smartwallet.MULTICALL3_ADDRESS, "0x")
    try:
        chain = settler(anvil, gas_key)
        try:
            answers = await settle_all(chain, payments)
        finally:
            await chain.close()
    finally:
        anvil.set_code(
            smartwallet.MULTICALL3_ADDRESS, load_contract("Multicall3").deployed_bytecode
        )
    assert all(a.success for a in answers)
    assert len({a.transaction for a in answers}) == 2  # no batch, nothing lost
    assert usdc.balance_of(seller) == 2 * PRICE
