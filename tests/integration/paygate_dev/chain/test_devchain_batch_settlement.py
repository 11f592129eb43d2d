"""Our x402BatchSettlement and deposit-collector stand-ins behave as the official SDK 2.25
expects: its client's deposits and vouchers, its facilitator's verify/deposit/claim/settle/refund
and its signing helpers all work against them on anvil, with Circle's FiatToken as USDC; the
contract's digests equal the SDK's; what must revert reverts."""

from __future__ import annotations

import pytest
from eth_account import Account
from paygate_dev.chain.build import load_contract
from paygate_dev.chain.constants import BATCH_SETTLEMENT_ADDRESS, NETWORK
from web3 import Web3
from web3.exceptions import ContractLogicError
from x402.mechanisms.evm import EthAccountSigner, FacilitatorWeb3Signer
from x402.mechanisms.evm.batch_settlement.authorizer_signer import (
    LocalAuthorizerSigner,
    sign_claim_batch,
)
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions
from x402.mechanisms.evm.batch_settlement.client.voucher import sign_voucher
from x402.mechanisms.evm.batch_settlement.errors import (
    ERR_CUMULATIVE_EXCEEDS_BALANCE,
    ERR_INVALID_VOUCHER_SIGNATURE,
)
from x402.mechanisms.evm.batch_settlement.facilitator import BatchSettlementEvmFacilitator
from x402.mechanisms.evm.batch_settlement.types import (
    ChannelConfig,
    ClaimPayload,
    EnrichedRefundPayload,
    SettlePayload,
    VoucherClaim,
    VoucherFields,
)
from x402.mechanisms.evm.batch_settlement.utils import compute_channel_id
from x402.schemas import PaymentPayload, PaymentRequirements

from tests.fixtures.chain import PAYER_FUNDS

DEPOSIT = 50_000
PRICE = 1_000


@pytest.fixture
def sdk(anvil, gas_key):
    authorizer = LocalAuthorizerSigner(Account.create())
    signer = FacilitatorWeb3Signer(private_key=gas_key.key, rpc_url=anvil.rpc_url)
    return BatchSettlementEvmFacilitator(signer, authorizer_signer=authorizer), authorizer


def requirements(usdc, seller, authorizer) -> PaymentRequirements:
    return PaymentRequirements(
        scheme="batch-settlement",
        network=NETWORK,
        asset=usdc.address,
        amount=str(PRICE),
        pay_to=seller,
        max_timeout_seconds=300,
        extra={
            "receiverAuthorizer": authorizer.address,
            "withdrawDelay": 900,
            "name": usdc.name,
            "version": usdc.version,
        },
    )


def contract(anvil):
    return anvil.w3.eth.contract(
        address=Web3.to_checksum_address(BATCH_SETTLEMENT_ADDRESS),
        abi=load_contract("X402BatchSettlement").abi,
    )


def paid(payload: dict, accepted: PaymentRequirements) -> PaymentPayload:
    return PaymentPayload(x402_version=2, payload=payload, accepted=accepted)


def test_the_sdk_deposits_claims_settles_and_refunds_through_the_stand_ins(
    anvil, usdc, payer, seller, sdk
):
    facilitator, authorizer = sdk
    accepted = requirements(usdc, seller, authorizer)
    client = BatchSettlementEvmScheme(
        EthAccountSigner(payer),
        BatchSettlementEvmSchemeOptions(deposit_strategy=lambda context: str(DEPOSIT)),
    )
    deposit = client.create_payment_payload(accepted)
    assert deposit["type"] == "deposit"
    config = ChannelConfig.from_dict(deposit["channelConfig"])
    channel = compute_channel_id(config, NETWORK)
    # The contract's channel id is the SDK's.
    assert (
        "0x" + contract(anvil).functions.getChannelId(tuple(_config_tuple(config))).call().hex()
        == channel.lower()
    )

    assert facilitator.verify(paid(deposit, accepted), accepted).is_valid
    settled = facilitator.settle(paid(deposit, accepted), accepted)
    assert settled.success, settled.error_reason
    assert settled.extra["channelState"]["balance"] == str(DEPOSIT)
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - DEPOSIT

    # Vouchers: the SDK verifies ours against the chain; forged and oversized ones fail.
    voucher = sign_voucher(EthAccountSigner(payer), channel, str(3 * PRICE), NETWORK)
    payload = {"type": "voucher", "channelConfig": config.to_dict(), "voucher": voucher.to_dict()}
    assert facilitator.verify(paid(payload, accepted), accepted).is_valid
    forged = sign_voucher(EthAccountSigner(Account.create()), channel, str(3 * PRICE), NETWORK)
    answer = facilitator.verify(paid({**payload, "voucher": forged.to_dict()}, accepted), accepted)
    assert answer.invalid_reason == ERR_INVALID_VOUCHER_SIGNATURE
    too_much = sign_voucher(EthAccountSigner(payer), channel, str(DEPOSIT + 1), NETWORK)
    answer = facilitator.verify(
        paid({**payload, "voucher": too_much.to_dict()}, accepted), accepted
    )
    assert answer.invalid_reason == ERR_CUMULATIVE_EXCEEDS_BALANCE

    # A claim (signed by the receiver authorizer), then the sweep to the seller.
    claim = VoucherClaim(config, voucher.max_claimable_amount, voucher.signature, str(2 * PRICE))
    claimed = facilitator.settle(paid(ClaimPayload(claims=[claim]).to_dict(), accepted), accepted)
    assert claimed.success, claimed.error_reason
    assert contract(anvil).functions.channels(bytes.fromhex(channel[2:])).call()[1] == 2 * PRICE
    swept = facilitator.settle(
        paid(SettlePayload(receiver=seller, token=usdc.address).to_dict(), accepted), accepted
    )
    assert swept.success, swept.error_reason
    assert usdc.balance_of(seller) == 2 * PRICE

    # The cooperative refund: claim the rest of what was charged, return the remainder.
    refund = EnrichedRefundPayload(
        channel_config=config,
        voucher=VoucherFields(channel, voucher.max_claimable_amount, voucher.signature),
        amount=str(DEPOSIT),
        refund_nonce="0",
        claims=[
            VoucherClaim(config, voucher.max_claimable_amount, voucher.signature, str(3 * PRICE))
        ],
    )
    refunded = facilitator.settle(paid(refund.to_dict(), accepted), accepted)
    assert refunded.success, refunded.error_reason
    assert refunded.amount == str(DEPOSIT - 3 * PRICE)
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 3 * PRICE
    state = contract(anvil).functions.channels(bytes.fromhex(channel[2:])).call()
    assert state == [3 * PRICE, 3 * PRICE]
    assert contract(anvil).functions.refundNonce(bytes.fromhex(channel[2:])).call() == 1


def test_what_must_revert_reverts_and_a_repeated_claim_pays_nothing(
    anvil, usdc, payer, seller, sdk, gas_key
):
    facilitator, authorizer = sdk
    accepted = requirements(usdc, seller, authorizer)
    client = BatchSettlementEvmScheme(
        EthAccountSigner(payer),
        BatchSettlementEvmSchemeOptions(deposit_strategy=lambda context: str(DEPOSIT)),
    )
    deposit = client.create_payment_payload(accepted)
    assert facilitator.settle(paid(deposit, accepted), accepted).success
    config = ChannelConfig.from_dict(deposit["channelConfig"])
    channel = compute_channel_id(config, NETWORK)
    bs = contract(anvil)
    voucher = sign_voucher(EthAccountSigner(payer), channel, str(5 * PRICE), NETWORK)
    row = (
        (_config_tuple(config), 5 * PRICE),
        bytes.fromhex(voucher.signature[2:]),
        5 * PRICE,
    )
    claim = VoucherClaim(config, voucher.max_claimable_amount, voucher.signature, str(5 * PRICE))
    good = bytes.fromhex(sign_claim_batch(authorizer, [claim], NETWORK)[2:])
    stranger = bytes.fromhex(
        sign_claim_batch(LocalAuthorizerSigner(Account.create()), [claim], NETWORK)[2:]
    )
    sender = {"from": gas_key.address}
    with pytest.raises(ContractLogicError):  # not the receiver authorizer's consent
        bs.functions.claimWithSignature([row], stranger).call(sender)
    over = ((_config_tuple(config), 5 * PRICE), row[1], 6 * PRICE)
    with pytest.raises(ContractLogicError):  # more than the voucher allows
        bs.functions.claimWithSignature(
            [over],
            bytes.fromhex(
                sign_claim_batch(
                    authorizer,
                    [VoucherClaim(config, str(5 * PRICE), voucher.signature, str(6 * PRICE))],
                    NETWORK,
                )[2:]
            ),
        ).call(sender)
    with pytest.raises(ContractLogicError):  # only the receiver (or its authorizer) claims
        bs.functions.claim([row]).call(sender)
    anvil.transact(bs.functions.claimWithSignature([row], good))
    # The same claim again is a no-op: nothing more is claimed for the seller.
    anvil.transact(bs.functions.claimWithSignature([row], good))
    assert bs.functions.receivers(seller, usdc.address).call() == [5 * PRICE, 0]
    anvil.transact(bs.functions.settle(seller, usdc.address))
    anvil.transact(bs.functions.settle(seller, usdc.address))  # nothing left: moves nothing
    assert usdc.balance_of(seller) == 5 * PRICE


def _config_tuple(config: ChannelConfig) -> tuple:
    return (
        Web3.to_checksum_address(config.payer),
        Web3.to_checksum_address(config.payer_authorizer),
        Web3.to_checksum_address(config.receiver),
        Web3.to_checksum_address(config.receiver_authorizer),
        Web3.to_checksum_address(config.token),
        config.withdraw_delay,
        bytes.fromhex(config.salt[2:]),
    )
