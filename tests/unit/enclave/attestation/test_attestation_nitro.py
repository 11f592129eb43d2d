"""Nitro verifier on AWS-signed attestation documents, their mutations, and documents from a
test-made Nitro-shaped PKI (binding, expiry, freshness)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import cbor2
import pytest

from enclave.attestation.base import ExpectedBinding, Verdict
from enclave.attestation.nitro import NitroPolicy, NitroVerifier, parse_document
from tests.fixtures.attestation_standins import FIXTURES, StandInNitroPki

NITRO = FIXTURES / "nitro"
PROD = (NITRO / "evervault_prod_2022-10-13.cbor").read_bytes()
DEBUG = (NITRO / "evervault_debug_2022-10-12.cbor").read_bytes()
PROD_AT = datetime(2022, 10, 13, 8, 58, 2, 136000, tzinfo=UTC)
DEBUG_AT = datetime(2022, 10, 12, 13, 50, 6, 81000, tzinfo=UTC)
PCR0 = (
    "f4d48b81a460c9916d1e685119074bf24660afd3e34fae9fca0a0d28d9d55999"
    "36332687e6f66fc890ac8cf150142d8b"
)


def verify(
    doc: bytes,
    *,
    at: datetime = PROD_AT,
    policy: NitroPolicy | None = None,
    binding: ExpectedBinding | None = None,
    trusted: tuple | None = None,
) -> Verdict:
    return NitroVerifier(policy or NitroPolicy(), roots=trusted).verify(
        doc, at=at, binding=binding or ExpectedBinding()
    )


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def test_production_document_passes_with_its_pcrs_and_nonce() -> None:
    doc = parse_document(PROD)
    assert doc.timestamp == PROD_AT
    assert not doc.debug
    policy = NitroPolicy(pcrs={0: frozenset({bytes.fromhex(PCR0)})}, max_age_seconds=60)
    v = verify(PROD, policy=policy, binding=ExpectedBinding(nonce=doc.nonce))
    assert v.ok, v.to_json()
    assert {c.name: c.status for c in v.checks}["nonce"] == "pass"


def test_debug_document_is_refused_under_a_no_debug_policy() -> None:
    assert verify(DEBUG, at=DEBUG_AT).codes == ("debug_not_allowed",)
    v = verify(
        DEBUG,
        at=DEBUG_AT,
        policy=NitroPolicy(allow_debug=True),
        binding=ExpectedBinding(user_data=b"hello, world!", public_key=b"my super secret key"),
    )
    assert v.ok, v.to_json()


def test_the_chain_is_checked_at_the_documents_own_time() -> None:
    # Years later the leaf (three hours) has long expired; the document still verifies as
    # recorded, and only a max-age policy turns the age into a refusal.
    later = datetime(2026, 12, 1, tzinfo=UTC)
    assert verify(PROD, at=later).ok
    assert verify(PROD, at=later, policy=NitroPolicy(max_age_seconds=600)).code == "evidence_stale"
    assert verify(PROD, at=PROD_AT - timedelta(hours=1)).code == "evidence_stale"


def test_a_flipped_bit_in_the_signature_is_refused() -> None:
    assert verify(flip(PROD, len(PROD) - 10)).code == "signature_invalid"


def test_a_flipped_bit_in_the_payload_is_refused() -> None:
    at = PROD.find(bytes.fromhex(PCR0))
    assert at > 0
    assert verify(flip(PROD, at + 7)).code == "signature_invalid"
    nonce = parse_document(PROD).nonce
    assert nonce is not None
    assert verify(flip(PROD, PROD.find(nonce) + 100)).code == "signature_invalid"


def test_broken_cbor_is_malformed() -> None:
    assert verify(PROD[:200]).code == "evidence_malformed"
    assert verify(cbor2.dumps([1, 2, 3])).code == "evidence_malformed"


def test_another_root_is_refused() -> None:
    assert verify(PROD, trusted=(StandInNitroPki.make().root,)).code == "untrusted_root"


def test_pcr_allow_list_and_binding_mismatches() -> None:
    assert verify(PROD, policy=NitroPolicy(pcrs={0: frozenset({bytes(48)})})).codes == (
        "measurement_mismatch",
    )
    assert verify(PROD, binding=ExpectedBinding(nonce=b"other")).codes == ("nonce_mismatch",)
    assert verify(PROD, binding=ExpectedBinding(user_data=b"x")).codes == ("user_data_mismatch",)
    assert verify(PROD, binding=ExpectedBinding(public_key=b"k")).codes == ("public_key_mismatch",)


# -- a test-made Nitro-shaped PKI ---------------------------------------------------------

T0 = datetime(2024, 1, 1, 12, tzinfo=UTC)


@pytest.fixture(scope="module")
def pki() -> StandInNitroPki:
    return StandInNitroPki.make(not_before=T0, hours=3)


def test_own_document_binds_nonce_user_data_and_sealing_key(pki: StandInNitroPki) -> None:
    spki = b"0Y0\x13\x06\x07*\x86H\xce=\x02\x01" + bytes(66)  # shape only; compared as bytes
    user_data = hashlib.sha256(b"binding document").digest()
    doc = pki.document(
        at=T0 + timedelta(minutes=5), nonce=b"n" * 32, user_data=user_data, public_key=spki
    )
    binding = ExpectedBinding(nonce=b"n" * 32, user_data=user_data, public_key=spki)
    v = verify(doc, at=T0 + timedelta(minutes=6), trusted=(pki.root,), binding=binding)
    assert v.ok, v.to_json()


def test_own_document_made_outside_its_leafs_validity_is_refused(pki: StandInNitroPki) -> None:
    doc = pki.document(at=T0 + timedelta(hours=4))
    v = verify(doc, at=T0 + timedelta(hours=4), trusted=(pki.root,))
    assert v.code == "chain_expired"


def test_policy_from_a_file_mapping() -> None:
    p = NitroPolicy.from_mapping({"pcrs": {"0": PCR0}, "max_age_seconds": 300})
    assert p.pcrs[0] == frozenset({bytes.fromhex(PCR0)})
    assert p.max_age_seconds == 300
    with pytest.raises(ValueError, match="unknown"):
        NitroPolicy.from_mapping({"pcr": {}})
