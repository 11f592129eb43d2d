"""Smart-wallet signatures in the local (sans-IO) checks: what is deferred to the settler and
what is refused here (paygate.x402.smartwallet). The on-chain half is
tests/integration/paygate/x402/test_smart_wallets.py."""

from __future__ import annotations

import contextlib
import time
from decimal import Decimal

import pytest
from eth_abi import encode
from eth_account import Account
from hypothesis import given
from hypothesis import strategies as st

from paygate.config import ConfigError, load_settings
from paygate.x402 import smartwallet
from paygate.x402.schemes.base import PaymentRejected
from paygate.x402.schemes.exact.verify import check_authorization
from paygate.x402.verify import match_offer
from tests.fixtures.x402_support import sdk_payment, terms

FACTORY = "0x" + "fa" * 20
WALLET_SIGNATURE = bytes(range(200))  # what a contract wallet signs is its own business


def wrapped(inner: bytes, factory: str = FACTORY, calldata: bytes = b"\x01\x02") -> bytes:
    return encode(["address", "bytes", "bytes"], [factory, calldata, inner]) + bytes.fromhex(
        "6492" * 16
    )


def with_signature(signature: bytes):
    payment = sdk_payment(2)
    wire = payment.wire()
    wire["payload"]["signature"] = "0x" + signature.hex()
    return type(payment).model_validate(wire)


def test_erc6492_is_unwrapped_and_anything_else_is_left_alone() -> None:
    parsed = smartwallet.parse(wrapped(WALLET_SIGNATURE))
    assert parsed.inner == WALLET_SIGNATURE
    assert parsed.deployment is not None
    assert parsed.deployment.factory.lower() == FACTORY
    assert parsed.deployment.calldata == b"\x01\x02"
    assert not parsed.is_ecdsa
    plain = smartwallet.parse(b"\x07" * 65)
    assert plain.is_ecdsa
    assert plain.deployment is None
    assert not smartwallet.parse(WALLET_SIGNATURE).is_ecdsa
    # An ECDSA signature inside a wrapper is still a counterfactual wallet's, not an EOA's.
    assert not smartwallet.parse(wrapped(b"\x07" * 65)).is_ecdsa


@pytest.mark.parametrize(
    "garbage",
    [
        bytes.fromhex("6492" * 16),  # the suffix alone
        b"\x00" * 40 + bytes.fromhex("6492" * 16),  # too short for the encoding
        encode(["uint256", "uint256", "uint256"], [2**200, 0, 0]) + bytes.fromhex("6492" * 16),
    ],
)
def test_a_malformed_erc6492_wrapper_is_refused_not_deferred(garbage: bytes) -> None:
    with pytest.raises(ValueError, match="malformed ERC-6492"):
        smartwallet.parse(garbage)
    assert not smartwallet.is_contract_signature("0x" + garbage.hex())


@given(st.binary(max_size=600))
def test_parse_raises_only_value_errors(raw: bytes) -> None:
    with contextlib.suppress(ValueError):
        smartwallet.parse(raw + bytes.fromhex("6492" * 16))


def test_the_local_check_defers_a_contract_wallets_signature_only() -> None:
    offers = terms().offers(Decimal("0.001"))
    now = int(time.time())
    for signature in (WALLET_SIGNATURE, wrapped(WALLET_SIGNATURE), wrapped(b"\x07" * 65)):
        payment = with_signature(signature)
        payer = check_authorization(payment, match_offer(payment, offers), now=now, skew=5)
        assert payer == payment.payload.authorization.from_  # the settler judges the rest
    # 65 bytes that do not recover the payer: an EOA's forgery, refused with no network call.
    stranger = Account.create()
    forged = with_signature(bytes(stranger.unsafe_sign_hash(b"\x11" * 32).signature))
    malformed = with_signature(b"\x00" * 40 + bytes.fromhex("6492" * 16))
    for payment in (forged, malformed):
        with pytest.raises(PaymentRejected) as info:
            check_authorization(payment, match_offer(payment, offers), now=now, skew=5)
        assert info.value.reason == "invalid_exact_evm_payload_signature"


def test_deferral_does_not_skip_the_other_checks() -> None:
    # A contract wallet's payment to someone else, or for another amount, is still refused.
    payment = sdk_payment(2)
    wire = payment.wire()
    wire["payload"]["signature"] = "0x" + WALLET_SIGNATURE.hex()
    wire["payload"]["authorization"]["value"] = "999"
    tampered = type(payment).model_validate(wire)
    offers = terms().offers(Decimal("0.001"))
    with pytest.raises(PaymentRejected) as info:
        check_authorization(tampered, match_offer(payment, offers), now=int(time.time()), skew=5)
    assert info.value.reason == "invalid_exact_evm_payload_authorization_value_mismatch"


def test_multicall_encoding_round_trips() -> None:
    data = smartwallet.aggregate3_data([(FACTORY, False, b"\x01"), (FACTORY, True, b"")])
    assert data[:4].hex() == "82ad56cb"  # aggregate3((address,bool,bytes)[])
    answer = encode(["(bool,bytes)[]"], [[(True, b""), (False, b"\x08\xc3")]])
    assert smartwallet.aggregate3_results(answer) == [(True, b""), (False, b"\x08\xc3")]
    reverted = bytes.fromhex("08c379a0") + encode(["string"], ["FiatTokenV2: invalid signature"])
    assert smartwallet.revert_text(reverted) == "FiatTokenV2: invalid signature"
    assert smartwallet.revert_text(b"\xde\xad") == "0xdead"
    call = smartwallet.is_valid_signature_data(b"\x22" * 32, b"\x33")
    assert call[:4] == smartwallet.EIP1271_MAGIC


def test_erc6492_factories_setting_splits_and_refuses_non_addresses(monkeypatch) -> None:
    monkeypatch.setenv("PAYGATE_ERC6492_FACTORIES", f"{FACTORY}, 0x{'ab' * 20}")
    assert load_settings(None).erc6492_factories == [FACTORY, "0x" + "ab" * 20]
    for bad in ("0x1234", "factory.example", f"{FACTORY},-1"):
        with pytest.raises(ConfigError, match="erc6492_factories"):
            load_settings(None, erc6492_factories=bad)
