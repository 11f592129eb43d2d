"""The hot path's EIP-712 digest and recovery (paygate.x402.typed_digest) give eth-account's
answers on the same inputs: digests, signers, and malformed or malleable signatures."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from Crypto.Hash import keccak
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import to_checksum_address

from paygate.x402 import typed_digest
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


# --- fixed vectors: computed before the hot path was made cheaper (session 23) --------------

KNOWN_PAYER = Account.from_key(b"\x11" * 32)
KNOWN_AUTH = Authorization.model_validate(
    {
        "from": KNOWN_PAYER.address,
        "to": "0x" + "22" * 20,
        "value": "1000",
        "validAfter": "0",
        "validBefore": "1900000000",
        "nonce": "0x" + "33" * 32,
    }
)
KNOWN_SIGNATURE = (
    "0x9be5e4a16775526824955ae281c8308450603316117d7879cd6a38cb1f1f8056"
    "0e348bdbaa7ceae292ddeb8ca55371e585eea5d609549b81f714cf9829919e711b"
)


def test_keccak_is_keccak_256_not_sha3() -> None:
    assert typed_digest.keccak(b"").hex() == (
        "c5d2460186f7233c927e7db2dcc703c0e500b653ca82273b7bfad8045d85a470"
    )
    assert typed_digest.keccak(b"abc").hex() == (
        "4e03657aea45a94fc7d47ba826c8d667c0d1e6e33a64a036ec44f58fa12d6c45"
    )
    for size in (0, 1, 135, 136, 137, 272, 1000):  # around the sponge's 136-byte rate
        data = secrets.token_bytes(size)
        assert typed_digest.keccak(data) == keccak.new(data=data, digest_bits=256).digest()
        assert typed_digest.keccak(bytearray(data)) == typed_digest.keccak(data)


def test_the_usdc_domain_digest_and_signer_are_what_they_always_were() -> None:
    separator = typed_digest.domain_separator(
        ASSET.name, ASSET.version, NETWORK.chain_id, ASSET.address
    )
    assert separator.hex() == "71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818"
    assert exact_verify.digest(KNOWN_AUTH, chain_id=NETWORK.chain_id, asset=ASSET).hex() == (
        "fb431ad27cc5bc10541ef7112ed6fb7cd40662327d0b7109821b94bb01d28208"
    )
    assert (
        exact_client.sign_authorization(
            KNOWN_PAYER, KNOWN_AUTH, chain_id=NETWORK.chain_id, asset=ASSET
        )
        == KNOWN_SIGNATURE
    )
    recovered = exact_verify.recover(
        KNOWN_AUTH, KNOWN_SIGNATURE, chain_id=NETWORK.chain_id, asset=ASSET
    )
    assert recovered == "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A" == KNOWN_PAYER.address


def test_checksums_are_eth_utils_in_any_case_and_odd_input_gets_its_answer() -> None:
    for _ in range(200):
        lower = "0x" + secrets.token_bytes(20).hex()
        expected = to_checksum_address(lower)
        for spelling in (lower, lower.upper().replace("0X", "0x"), expected):
            assert typed_digest.checksum(spelling) == expected
    # Not 0x and 40 hex digits: whatever eth-utils makes of it, its errors included.
    raw = secrets.token_bytes(20)
    assert typed_digest.checksum(raw) == to_checksum_address(raw)  # type: ignore[arg-type]
    for bad in ("0x" + "g" * 40, "0x" + "ab" * 19, "0x" + "ab" * 21, "", "0x", "0X" + "ab" * 20):
        assert _outcome(typed_digest.checksum, bad) == _outcome(to_checksum_address, bad)


def _outcome(function: Any, value: str) -> tuple[str, str]:
    try:
        return "ok", function(value)
    except Exception as exc:
        return type(exc).__name__, str(exc)
