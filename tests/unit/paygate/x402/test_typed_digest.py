"""The hot path's EIP-712 digest and recovery (paygate.x402.typed_digest) give eth-account's
answers on the same inputs: digests, signers, and malformed or malleable signatures."""

from __future__ import annotations

import secrets

import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data

from paygate.x402.networks import resolve_network
from paygate.x402.schemes.exact import client as exact_client
from paygate.x402.schemes.exact import verify as exact_verify
from paygate.x402.schemes.exact.payload import Authorization

N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
NETWORK = resolve_network("base-sepolia")
ASSET = NETWORK.usdc


def reference(auth: Authorization, raw: bytes) -> str | None:
    """eth-account's own answer for the same authorization and signature bytes."""
    message = encode_typed_data(
        full_message=exact_verify.typed_data(auth, chain_id=NETWORK.chain_id, asset=ASSET)
    )
    try:
        return str(Account.recover_message(message, signature=raw))
    except Exception:
        return None


def signed(value: int = 1000) -> tuple[Authorization, bytes, str]:
    account = Account.create()
    auth = exact_client.new_authorization(
        payer=account.address, pay_to=Account.create().address, value=value, valid_for=600
    )
    signature = exact_client.sign_authorization(
        account, auth, chain_id=NETWORK.chain_id, asset=ASSET
    )
    return auth, bytes.fromhex(signature[2:]), account.address


@pytest.mark.parametrize("value", [0, 1, 10**6, 2**256 - 1])
def test_the_digest_is_eth_accounts(value: int) -> None:
    auth, _, _ = signed(value)
    message = encode_typed_data(
        full_message=exact_verify.typed_data(auth, chain_id=NETWORK.chain_id, asset=ASSET)
    )
    assert exact_verify.digest(auth, chain_id=NETWORK.chain_id, asset=ASSET) == (
        _hash_eip191_message(message)
    )


def test_a_good_signature_recovers_the_payer_both_ways() -> None:
    for _ in range(20):
        auth, raw, payer = signed()
        fast = exact_verify.recover(auth, "0x" + raw.hex(), chain_id=NETWORK.chain_id, asset=ASSET)
        assert fast == payer == reference(auth, raw)


def mutations(raw: bytes) -> list[bytes]:
    r, s, v = raw[:32], int.from_bytes(raw[32:64], "big"), raw[64]
    flipped = 55 - v  # 27 <-> 28
    return [
        r + (N - s).to_bytes(32, "big") + bytes((flipped,)),  # the malleable twin
        r + (N - s).to_bytes(32, "big") + bytes((v,)),
        bytes(32) + raw[32:],  # r = 0
        r + bytes(32) + bytes((v,)),  # s = 0
        N.to_bytes(32, "big") + raw[32:],  # r = N
        r + N.to_bytes(32, "big") + bytes((v,)),  # s = N
        b"\xff" * 64 + bytes((v,)),
        raw[:64] + bytes((flipped,)),  # another key
        raw[:64] + b"\x00",  # v outside 27/28: eth-account's own path
        raw[:64] + b"\x01",
        raw[:64] + b"\x1d",
        raw[:64] + bytes((37,)),
        secrets.token_bytes(64) + bytes((v,)),
    ]


def test_malformed_and_malleable_signatures_get_eth_accounts_answer() -> None:
    for _ in range(5):
        auth, raw, _ = signed()
        for bad in mutations(raw):
            fast = exact_verify.recover(
                auth, "0x" + bad.hex(), chain_id=NETWORK.chain_id, asset=ASSET
            )
            assert fast == reference(auth, bad), bad.hex()


def test_a_signature_of_another_length_recovers_nothing() -> None:
    auth, raw, _ = signed()
    for bad in (raw[:64], raw + b"\x00", b""):
        assert (
            exact_verify.recover(auth, "0x" + bad.hex(), chain_id=NETWORK.chain_id, asset=ASSET)
            is None
        )
