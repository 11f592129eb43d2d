"""TDX verifier on Intel-signed quotes (v4 with its complete 2023 collateral, v5), mutations,
and TCB info re-signed by a signer the tests make to reach the passing and policy branches."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from enclave.attestation import roots
from enclave.attestation.base import ExpectedBinding, Verdict
from enclave.attestation.certs import load_certificates
from enclave.attestation.tdx import (
    TdxCollateral,
    TdxPolicy,
    TdxVerifier,
    module_tcb_status,
    parse_quote,
    pck_tcb,
    platform_tcb_status,
    signed_json,
)
from tests.fixtures.attestation_standins import FIXTURES

TDX = FIXTURES / "tdx"
AT_V4 = datetime(2023, 7, 1, tzinfo=UTC)
AT_V5 = datetime(2026, 2, 15, tzinfo=UTC)
V4 = (TDX / "quote_v4_spr_e4.dat").read_bytes()
V5 = (TDX / "quote_v5_sample.dat").read_bytes()
COLLATERAL = TdxCollateral.from_dir(TDX / "collateral-2023")
MR_TD = (
    "6363b8043668a3ad953278e10389574d326c6749fb78aa81"
    "0ecd9336923db86f22fc00b8dcd404bc10d5e119d7215cbb"
)
REPORT_DATA = (
    "6c62dec1b8191749a31dab490be532a35944dea47caef1f980863993d9899545"
    "eb7406a38d1eed313b987a467dacead6f0c87a6d766c66f6f29f8acb281f1113"
)


def verify(
    quote: bytes = V4,
    *,
    collateral: TdxCollateral = COLLATERAL,
    at: datetime = AT_V4,
    policy: TdxPolicy | None = None,
    binding: ExpectedBinding | None = None,
    trusted: list | None = None,
) -> Verdict:
    v = TdxVerifier(policy or TdxPolicy(), collateral, roots=trusted)
    return v.verify(quote, at=at, binding=binding or ExpectedBinding())


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


def test_v4_quote_with_its_2023_collateral_is_tcb_level_not_supported() -> None:
    v = verify(
        binding=ExpectedBinding(report_data=bytes.fromhex(REPORT_DATA)),
        policy=TdxPolicy(mr_td=frozenset({bytes.fromhex(MR_TD)})),
    )
    # Every cryptographic and collateral check passes; only the platform's TCB level fails.
    assert v.codes == ("tcb_not_supported",), v.to_json()
    passed = {c.name for c in v.checks if c.status == "pass"}
    assert {
        "pck_chain_signatures",
        "pck_chain_root",
        "pck_chain_validity",
        "qe_report_signature",
        "attestation_key_binding",
        "quote_signature",
        "tcb_signing_chain_signatures",
        "tcb_info_signature",
        "qe_identity_signature",
        "collateral_freshness",
        "crl_signatures",
        "revocation",
        "fmspc",
        "qe_identity",
        "qe_tcb_status",
        "tdx_module",
        "debug",
        "mr_td",
        "report_data",
    } <= passed
    assert v.claims["mr_td"] == MR_TD


def test_v5_quote_verifies_but_its_collateral_is_incomplete() -> None:
    v = verify(V5, collateral=TdxCollateral.from_dir(TDX / "collateral-v5"), at=AT_V5)
    assert v.codes == ("collateral_incomplete",), v.to_json()
    assert {c.name: c.status for c in v.checks}["quote_signature"] == "pass"
    assert parse_quote(V5).signed_len == 702


def test_v5_tcb_levels_are_up_to_date_by_the_2026_tcb_info() -> None:
    quote = parse_quote(V5)
    body = (TDX / "collateral-v5" / "tcb_info.json").read_bytes()
    tcb_info, _, _ = signed_json(body, "tcbInfo")
    pck = pck_tcb(load_certificates(quote.pck_chain_pem)[0])
    assert pck.fmspc == "90c06f000000"
    assert platform_tcb_status(tcb_info, pck, quote.body["tee_tcb_svn"]) == "UpToDate"
    assert module_tcb_status(tcb_info, quote.body["tee_tcb_svn"]) == ("TDX_01", "UpToDate")


def _sig_data_offset(q: bytes) -> int:
    return parse_quote(q).signed_len + 4


@pytest.mark.parametrize(
    ("where", "code"),
    [
        (lambda q: _sig_data_offset(q) + 3, "signature_invalid"),  # the quote signature
        (lambda q: 48 + 136 + 5, "signature_invalid"),  # mr_td in the TD body
        (lambda q: 48 + 520 + 1, "signature_invalid"),  # report_data in the TD body
        (lambda q: _sig_data_offset(q) + 134 + 10, "qe_report_invalid"),  # the QE report
        (lambda q: _sig_data_offset(q) + 134 + 384 + 7, "qe_report_invalid"),  # its signature
        (lambda q: _sig_data_offset(q) + 64 + 9, "attestation_key_unbound"),  # the AK
    ],
    ids=["quote-sig", "mr_td", "report_data", "qe-report", "qe-report-sig", "attestation-key"],
)
def test_a_flipped_bit_is_refused_with_its_code(where, code: str) -> None:
    v = verify(flip(V4, where(V4)))
    assert v.code == code, v.to_json()


def test_truncated_and_foreign_quotes_are_malformed() -> None:
    assert verify(V4[:700]).code == "evidence_malformed"
    assert verify(b"\x03\x00" + V4[2:]).code == "unsupported_version"


def test_a_time_outside_the_pck_chain_is_refused() -> None:
    assert verify(at=datetime(2030, 1, 1, tzinfo=UTC)).code == "chain_expired"


def test_collateral_past_its_next_update_is_stale() -> None:
    assert verify(at=datetime(2023, 7, 20, tzinfo=UTC)).code == "collateral_stale"


def test_tampered_tcb_info_is_refused() -> None:
    body = COLLATERAL.tcb_info.replace(b'"tcbStatus":"OutOfDate"', b'"tcbStatus":"UpToDate"', 1)
    assert body != COLLATERAL.tcb_info
    v = verify(collateral=dataclasses.replace(COLLATERAL, tcb_info=body))
    assert v.code == "collateral_invalid"


def test_report_data_that_does_not_match_the_binding_is_refused() -> None:
    digest = hashlib.sha512(b"another binding document").digest()
    v = verify(binding=ExpectedBinding(report_data=digest))
    assert "report_data_mismatch" in v.codes


def test_mr_td_not_on_the_allow_list_is_refused() -> None:
    v = verify(policy=TdxPolicy(mr_td=frozenset({bytes(48)})))
    assert "measurement_mismatch" in v.codes


def test_each_missing_piece_of_collateral_is_named() -> None:
    v = verify(collateral=dataclasses.replace(COLLATERAL, pck_crl=None))
    assert v.code == "collateral_incomplete"
    assert "pck_crl.der" in next(c.detail for c in v.checks if c.name == "collateral")


# -- TCB info re-signed by a test-made signer under a test-made root --------------------


def _resign(body: bytes, key: str, signer: ec.EllipticCurvePrivateKey, edit) -> bytes:
    obj, _, _ = signed_json(body, key)
    obj = edit(json.loads(json.dumps(obj)))
    inner = json.dumps(obj, separators=(",", ":"))
    r, s = decode_dss_signature(signer.sign(inner.encode(), ec.ECDSA(hashes.SHA256())))
    sig = (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
    return f'{{"{key}":{inner},"signature":"{sig}"}}'.encode()


@pytest.fixture(scope="module")
def own_signer() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bytes]:
    root_key = ec.generate_private_key(ec.SECP256R1())
    signer_key = ec.generate_private_key(ec.SECP256R1())
    start = datetime(2023, 1, 1, tzinfo=UTC)

    def cert(cn: str, key, issuer: str, by, ca: bool) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + timedelta(days=365))
        )
        if ca:
            b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        return b.sign(by, hashes.SHA256())

    root = cert("stand-in TCB root", root_key, "stand-in TCB root", root_key, True)
    signer = cert("stand-in TCB signing", signer_key, "stand-in TCB root", root_key, False)
    pem = signer.public_bytes(serialization.Encoding.PEM) + root.public_bytes(
        serialization.Encoding.PEM
    )
    return root, signer_key, pem


def _lowered(status: str):
    def edit(tcb_info: dict) -> dict:
        # The platform's level (SGX 3,3,2,2,2,1,0,2; PCESVN 11; TDX 3,0,4) becomes a listed level.
        level = tcb_info["tcbLevels"][-1]
        for i, c in enumerate(level["tcb"]["sgxtcbcomponents"]):
            c["svn"] = [3, 3, 2, 2, 2, 1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0][i]
        for c in level["tcb"]["tdxtcbcomponents"]:
            c["svn"] = 0
        level["tcb"]["pcesvn"] = 11
        level["tcbStatus"] = status
        return tcb_info

    return edit


@pytest.mark.parametrize(("status", "accepted", "code"), [
    ("UpToDate", {"UpToDate"}, None),
    ("OutOfDate", {"UpToDate"}, "tcb_status_not_accepted"),
    ("OutOfDate", {"UpToDate", "OutOfDate"}, None),
    ("SWHardeningNeeded", {"UpToDate"}, "tcb_status_not_accepted"),
])  # fmt: skip
def test_tcb_status_against_policy_with_resigned_tcb_info(own_signer, status, accepted, code):
    root, signer_key, chain = own_signer
    tcb = _resign(COLLATERAL.tcb_info, "tcbInfo", signer_key, _lowered(status))
    qe = _resign(COLLATERAL.qe_identity, "enclaveIdentity", signer_key, lambda o: o)
    col = dataclasses.replace(COLLATERAL, tcb_info=tcb, qe_identity=qe, tcb_signing_chain=chain)
    v = verify(
        collateral=col,
        trusted=[roots.intel_sgx_root(), root],
        policy=TdxPolicy(accepted_tcb_statuses=frozenset(accepted)),
    )
    assert v.code == code, v.to_json()


def test_resigned_collateral_under_the_pinned_root_alone_is_refused(own_signer) -> None:
    _, signer_key, chain = own_signer
    tcb = _resign(COLLATERAL.tcb_info, "tcbInfo", signer_key, _lowered("UpToDate"))
    col = dataclasses.replace(COLLATERAL, tcb_info=tcb, tcb_signing_chain=chain)
    v = verify(collateral=col)
    assert v.code == "untrusted_root"
    assert "collateral_invalid" in v.codes  # the QE identity is not signed by this signer


def test_policy_from_a_file_mapping() -> None:
    p = TdxPolicy.from_mapping({"mr_td": [MR_TD], "accepted_tcb_statuses": ["UpToDate"]})
    assert p.mr_td == frozenset({bytes.fromhex(MR_TD)})
    with pytest.raises(ValueError, match="accepted_tcb_statuses"):
        TdxPolicy.from_mapping({"accepted_tcb_statuses": ["Revoked"]})


def test_quote_layout_is_read_where_intel_puts_it() -> None:
    q = parse_quote(V4)
    assert (q.version, q.signed_len, q.td_attributes) == (4, 632, 0x40000000)
    assert struct.unpack_from("<H", V4, 0)[0] == 4
    assert q.body["report_data"].hex() == REPORT_DATA
