"""The batch-settlement hot path's EIP-712 digests and recovery (written out, libsecp256k1)
give what eth-account's generic encoder and recovery give, on the same inputs."""

from __future__ import annotations

import os

import pytest
from eth_account import Account

from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig

CHAIN = 84532
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _config(delay: int = 900) -> ChannelConfig:
    a, b, c = (Account.create().address for _ in range(3))
    return ChannelConfig(
        payer=a,
        payer_authorizer=a,
        receiver=b,
        receiver_authorizer=c,
        token="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
        withdraw_delay=delay,
        salt="0x" + os.urandom(32).hex(),
    )


def _slow_id(config: ChannelConfig, chain_id: int) -> str:
    message = ch.config_message(config)
    return (
        "0x"
        + ch._digest(chain_id, {"ChannelConfig": ch.CHANNEL_CONFIG}, "ChannelConfig", message).hex()
    )


def _slow_signer(channel: str, maximum: int, signature: bytes, chain_id: int) -> str | None:
    digest = ch._digest(
        chain_id, {"Voucher": ch._VOUCHER}, "Voucher", ch._voucher_message(channel, maximum)
    )
    try:
        return str(Account._recover_hash(digest, signature=signature))
    except Exception:
        return None


@pytest.mark.parametrize("delay", [0, 900, 2**40 - 1])
@pytest.mark.parametrize("chain_id", [1, CHAIN, 2**63])
def test_channel_id_is_eth_accounts_eip712_hash(delay: int, chain_id: int) -> None:
    config = _config(delay)
    assert ch.channel_id(config, chain_id) == _slow_id(config, chain_id)


@pytest.mark.parametrize("maximum", [0, 1, 10**6, ch.UINT128_MAX])
def test_a_signed_voucher_recovers_its_payer_as_eth_account_does(maximum: int) -> None:
    payer = Account.create()
    channel = ch.channel_id(_config(), CHAIN)
    signature = ch.sign_voucher(payer, channel, maximum, CHAIN)
    assert ch.voucher_signer(channel, maximum, signature, CHAIN) == payer.address
    assert _slow_signer(channel, maximum, bytes.fromhex(signature[2:]), CHAIN) == payer.address
    # Another amount, channel or chain: another digest, not the payer.
    assert ch.voucher_signer(channel, maximum ^ 1, signature, CHAIN) != payer.address
    assert ch.voucher_signer(channel, maximum, signature, CHAIN + 1) != payer.address


def test_malformed_and_malleable_signatures_agree_with_eth_account() -> None:
    payer = Account.create()
    channel = ch.channel_id(_config(), CHAIN)
    good = bytes.fromhex(ch.sign_voucher(payer, channel, 5, CHAIN)[2:])
    r, s, v = good[:32], int.from_bytes(good[32:64], "big"), good[64]
    high_s = r + (_N - s).to_bytes(32, "big") + bytes((55 - v,))  # the other half, v flipped
    cases = [
        good,
        good[:64] + bytes((v - 27,)),  # v as 0/1
        high_s,
        good[:64] + b"\x1d",  # v 29
        b"\0" * 65,
        b"\xff" * 65,
        r + _N.to_bytes(32, "big") + bytes((v,)),  # s = N
        os.urandom(64) + b"\x1b",
        good[:64],  # 64 bytes
        good + b"\0",  # 66 bytes
    ]
    for raw in cases:
        expected = _slow_signer(channel, 5, raw, CHAIN) if len(raw) == 65 else None
        assert ch.voucher_signer(channel, 5, "0x" + raw.hex(), CHAIN) == expected, raw.hex()


def test_out_of_type_amounts_and_channels_recover_nobody() -> None:
    payer = Account.create()
    channel = ch.channel_id(_config(), CHAIN)
    signature = ch.sign_voucher(payer, channel, 5, CHAIN)
    assert ch.voucher_signer(channel, ch.UINT128_MAX + 1, signature, CHAIN) is None
    assert ch.voucher_signer(channel, -1, signature, CHAIN) is None
    assert ch.voucher_signer(channel[:-2], 5, signature, CHAIN) is None
    assert ch.voucher_signer(channel, 5, "0xzz", CHAIN) is None
