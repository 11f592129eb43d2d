"""SEV-SNP verifier on AMD-signed reports from real Milan and Genoa hosts, their mutations, and
a chain the tests make whose VCEK disagrees with the report."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave.attestation import roots
from enclave.attestation.base import Code, ExpectedBinding, Verdict
from enclave.attestation.sev_snp import (
    GUID_VCEK,
    SevSnpPolicy,
    SevSnpVerifier,
    SnpTcb,
    parse_cert_table,
    parse_report,
)
from tests.fixtures.attestation_standins import (
    FIXTURES,
    StandInAmdPki,
    cert_table,
    snp_report,
)

SEV = FIXTURES / "sev-snp"
AT = datetime(2025, 6, 1, tzinfo=UTC)  # the time the samples are documented at
NO_DEBUG = SevSnpPolicy()

SAMPLES = {
    # name: (report, VCEK, measurement, report_data prefix)
    "gsg": ("gsg_report.bin", "gsg_vcek.der",
            "b07af9620f3b839b47996422ddec6058338951d984e312115131ea82705eaf5b6bdf8a9ece31a5a608eb0cf2e4872b01",
            "0102030405"),
    "virtee": ("virtee_report_milan.hex", "virtee_vcek_milan.der",
               "7a1e5c266c0108dbc9bb94fa926951320940915d0aafb42464bd88b579ea158d3e1a0dc39b2c60bd95b9c480cd81841f",
               "d447b55d197491bfe15cf298f9de9986b7a7c4be2468b4f6e2d53b71d7c645810b0f2cdfca0040433be063fc1a8293f0f3f8dae7b79fecb3d1cd82bd6a93ebfd"),
    "azure-genoa": ("azure_genoa_report.bin", "azure_genoa_vcek.pem",
                    "f57dc09a507c6ecd82369bffb600f0003792f4d99bc26e985ec0c266fc34faf3706faf814c9e61065768a6ff917c89ae",
                    "b581f12e29a2d7d64e5e0b738d563879a78b51c644d0fa0cce02b48699f6bf5f"),
}  # fmt: skip


def verify(
    report: bytes,
    certs: list[bytes],
    *,
    policy: SevSnpPolicy = NO_DEBUG,
    at: datetime = AT,
    binding: ExpectedBinding | None = None,
    trusted: list | None = None,
) -> Verdict:
    verifier = SevSnpVerifier(policy, certificates=certs, roots=trusted)
    return verifier.verify(report, at=at, binding=binding or ExpectedBinding())


def sample(name: str) -> tuple[bytes, bytes]:
    report, vcek, _, _ = SAMPLES[name]
    return (SEV / report).read_bytes(), (SEV / vcek).read_bytes()


def flip(data: bytes, offset: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[offset] ^= 1 << bit
    return bytes(out)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_passes_with_its_measurement_and_binding(name: str) -> None:
    report, vcek = sample(name)
    _, _, measurement, data = SAMPLES[name]
    policy = SevSnpPolicy(
        measurements=frozenset({bytes.fromhex(measurement)}), allow_debug=name == "gsg"
    )
    v = verify(
        report, [vcek], policy=policy, binding=ExpectedBinding(report_data=bytes.fromhex(data))
    )
    assert v.ok, v.to_json()
    statuses = {c.name: c.status for c in v.checks}
    for must in (
        "chain_signatures",
        "chain_root",
        "chain_validity",
        "report_signature",
        "chip_id",
        "reported_tcb",
        "measurement",
        "report_data",
    ):
        assert statuses[must] == "pass", must


@pytest.mark.parametrize(
    ("name", "code"), [("gsg", "debug_not_allowed"), ("virtee", None), ("azure-genoa", None)]
)
def test_sample_verdicts_under_a_no_debug_policy(name: str, code: str | None) -> None:
    report, vcek = sample(name)
    v = verify(report, [vcek])
    assert v.code == code
    assert v.codes == ((code,) if code else ())


def test_report_fields_are_read_where_amd_puts_them() -> None:
    r = parse_report((SEV / "azure_genoa_report.bin").read_bytes())
    assert (r.version, r.policy, r.vmpl, r.signing_key) == (3, 0x3001F, 0, 0)
    assert r.reported_tcb == SnpTcb(bootloader=10, tee=0, snp=23, microcode=84)
    assert r.chip_id[:8].hex() == "0506ffba875e939c"
    assert parse_report((SEV / "gsg_report.bin").read_bytes()).debug


def test_azure_report_binds_its_runtime_key_through_report_data() -> None:
    # Real hardware binding a key: Azure's HCL report is a 32-byte header, the SNP report, a
    # 20-byte header whose last u32 is the size of the runtime data (JSON holding HCLAkPub),
    # then that data; report_data is SHA-256 of it followed by 32 zero bytes.
    hcl = (SEV / "azure_genoa_hcl_report.bin").read_bytes()
    report = hcl[32 : 32 + 1184]
    (size,) = struct.unpack_from("<I", hcl, 32 + 1184 + 16)
    runtime = hcl[32 + 1184 + 20 : 32 + 1184 + 20 + size]
    assert b"HCLAkPub" in runtime
    _, vcek = sample("azure-genoa")
    digest = hashlib.sha256(runtime).digest()
    assert verify(report, [vcek], binding=ExpectedBinding(report_data=digest)).ok
    tampered = runtime.replace(b"HCLAkPub", b"HCLAkPuc")
    other = ExpectedBinding(report_data=hashlib.sha256(tampered).digest())
    assert verify(report, [vcek], binding=other).codes == ("report_data_mismatch",)


def test_the_report_may_come_with_its_whole_chain_in_a_certificate_table() -> None:
    report, vcek = sample("virtee")
    table = cert_table({GUID_VCEK: vcek})
    certs = parse_cert_table(table)
    v = verify(report, [certs[GUID_VCEK], (SEV / "amd_milan_ask_ark.pem").read_bytes()])
    assert v.ok, v.to_json()


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda r, c: (flip(r, 0x2A0 + 5), c), "signature_invalid"),  # r of the signature
        (lambda r, c: (flip(r, 0x2E8 + 70), c), "signature_invalid"),  # s of the signature
        (lambda r, c: (flip(r, 0x90 + 3), c), "signature_invalid"),  # the measurement
        (lambda r, c: (flip(r, 0x50), c), "signature_invalid"),  # the report data
        (lambda r, c: (r, [flip(c[0], len(c[0]) - 600)]), "chain_invalid"),  # inside the VCEK
        (lambda r, c: (r[:1000], c), "evidence_malformed"),
        (lambda r, c: (b"\x01" + r[1:], c), "unsupported_version"),  # version 1
        (lambda r, c: (r, []), "collateral_incomplete"),  # no VCEK given
    ],
    ids=["sig-r", "sig-s", "measurement", "report-data", "vcek", "truncated", "version", "no-vcek"],
)
def test_a_flipped_bit_is_refused_with_its_code(mutate, code: str) -> None:
    report, vcek = sample("virtee")
    report = parse_report(report).raw
    bad_report, bad_certs = mutate(report, [vcek])
    v = verify(bad_report, bad_certs)
    assert not v.ok
    assert v.code == code, v.to_json()


def test_the_flipped_vcek_bit_is_inside_the_signed_certificate() -> None:
    _, vcek = sample("virtee")
    # The bit flipped above lies in the TBS part (the VCEK's extensions), not its signature.
    assert vcek.find(bytes.fromhex("d49554ec717f4e5b")) < len(vcek) - 600 < len(vcek) - 520


def test_the_wrong_products_chain_is_refused() -> None:
    report, vcek = sample("virtee")  # a Milan report and VCEK
    v = verify(report, [vcek, (SEV / "amd_genoa_ask_ark.pem").read_bytes()])
    assert v.code == "wrong_product"
    genoa_report, genoa_vcek = sample("azure-genoa")
    v = verify(genoa_report, [genoa_vcek, (SEV / "amd_milan_ask_ark.pem").read_bytes()])
    assert v.code == "wrong_product"


def test_a_product_the_policy_does_not_accept_is_refused() -> None:
    report, vcek = sample("azure-genoa")
    v = verify(report, [vcek], policy=SevSnpPolicy(products=frozenset({"Milan"})))
    assert v.code == "wrong_product"


@pytest.mark.parametrize("at", [datetime(2030, 6, 1, tzinfo=UTC), datetime(2023, 1, 1, tzinfo=UTC)])
def test_a_time_outside_the_vcek_validity_is_refused(at: datetime) -> None:
    report, vcek = sample("virtee")  # VCEK 2023-04-03 .. 2030-04-03
    assert verify(report, [vcek], at=at).code == "chain_expired"


def test_a_root_that_is_not_pinned_is_refused() -> None:
    report, vcek = sample("virtee")
    other = StandInAmdPki.make()
    assert verify(report, [vcek], trusted=[other.ark]).code == "untrusted_root"


def test_report_data_that_does_not_match_the_binding_is_refused() -> None:
    report, vcek = sample("virtee")
    digest = hashlib.sha512(b"another binding document").digest()
    v = verify(report, [vcek], binding=ExpectedBinding(report_data=digest))
    assert v.codes == ("report_data_mismatch",)


@pytest.mark.parametrize(
    ("policy", "code"),
    [
        (SevSnpPolicy(measurements=frozenset({bytes(48)})), "measurement_mismatch"),
        (SevSnpPolicy(minimum_tcb=SnpTcb(3, 0, 9, 115)), "tcb_too_low"),
        (SevSnpPolicy(allow_smt=False), "guest_policy_not_allowed"),
        (SevSnpPolicy(vmpl=1), "guest_policy_not_allowed"),
        (SevSnpPolicy(host_data=b"\x01" * 32), "host_data_mismatch"),
    ],
)
def test_policy_refusals(policy: SevSnpPolicy, code: str) -> None:
    report, vcek = sample("virtee")
    assert verify(report, [vcek], policy=policy).codes == (code,)


def test_policy_from_a_file_mapping() -> None:
    p = SevSnpPolicy.from_mapping(
        {
            "measurements": [SAMPLES["virtee"][2]],
            "allow_debug": True,
            "minimum_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115},
        }
    )
    report, vcek = sample("virtee")
    assert verify(report, [vcek], policy=p).ok
    with pytest.raises(ValueError, match="unknown"):
        SevSnpPolicy.from_mapping({"measurment": []})


def test_shipped_roots_are_the_pinned_arks() -> None:
    assert {c.subject.rfc4514_string().split(",")[0] for c in roots.amd_arks()} == {
        "CN=ARK-Milan",
        "CN=ARK-Genoa",
    }


# -- a chain the tests make: signatures alone are not enough -----------------------------

TCB = SnpTcb(bootloader=3, tee=0, snp=8, microcode=115)
CHIP = bytes(range(64))


@pytest.fixture(scope="module")
def pki() -> StandInAmdPki:
    return StandInAmdPki.make()


def own(
    pki: StandInAmdPki, *, cert_hwid: bytes = CHIP, cert_tcb: SnpTcb = TCB, report_tcb: SnpTcb = TCB
) -> Verdict:
    key = ec.generate_private_key(ec.SECP384R1())
    vcek = pki.vcek(key, hwid=cert_hwid, tcb=cert_tcb)
    report = snp_report(key, report_data=b"\x42" * 64, chip_id=CHIP, tcb=report_tcb)
    pem = serialization.Encoding.PEM
    certs = [vcek.public_bytes(pem), pki.ask.public_bytes(pem) + pki.ark.public_bytes(pem)]
    return verify(
        report, certs, trusted=[pki.ark], binding=ExpectedBinding(report_data=b"\x42" * 64)
    )


def test_own_chain_with_matching_vcek_passes(pki: StandInAmdPki) -> None:
    v = own(pki)
    assert v.ok, v.to_json()


def test_own_chain_whose_vcek_names_another_chip_is_refused(pki: StandInAmdPki) -> None:
    v = own(pki, cert_hwid=bytes(reversed(CHIP)))
    assert v.codes == ("hwid_mismatch",)


@pytest.mark.parametrize(
    "cert_tcb", [SnpTcb(3, 0, 9, 115), SnpTcb(2, 0, 8, 115), SnpTcb(3, 0, 8, 116)]
)
def test_own_chain_whose_vcek_has_another_tcb_is_refused(pki: StandInAmdPki, cert_tcb) -> None:
    v = own(pki, cert_tcb=cert_tcb)
    assert v.codes == ("tcb_mismatch",)


def test_own_chain_is_refused_under_the_pinned_roots(pki: StandInAmdPki) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    vcek = pki.vcek(key, hwid=CHIP, tcb=TCB)
    report = snp_report(key, report_data=bytes(64), chip_id=CHIP, tcb=TCB)
    pem = serialization.Encoding.PEM
    v = verify(
        report, [vcek.public_bytes(pem), pki.ask.public_bytes(pem), pki.ark.public_bytes(pem)]
    )
    assert v.code == "untrusted_root"
    assert Code.UNTRUSTED_ROOT in v.codes


def test_own_vlek_chain_passes_without_a_chip_id() -> None:
    asvk = StandInAmdPki.make(vlek=True)
    key = ec.generate_private_key(ec.SECP384R1())
    vlek = asvk.vcek(key, hwid=CHIP, tcb=TCB, vlek=True)
    report = snp_report(key, report_data=bytes(64), chip_id=bytes(64), tcb=TCB, signing_key=1)
    pem = serialization.Encoding.PEM
    certs = [vlek.public_bytes(pem), asvk.ask.public_bytes(pem), asvk.ark.public_bytes(pem)]
    v = verify(report, certs, trusted=[asvk.ark])
    assert v.ok, v.to_json()
    assert {c.name: c.status for c in v.checks}["chip_id"] == "skip"
    no_vlek = SevSnpPolicy(allow_vlek=False)
    assert (
        verify(report, certs, trusted=[asvk.ark], policy=no_vlek).code == "guest_policy_not_allowed"
    )
    # A VLEK-signed report given no VLEK is incomplete, not silently accepted.
    assert verify(report, [], trusted=[asvk.ark]).code == "collateral_incomplete"


def test_shipped_intermediates_are_signed_by_the_pinned_arks() -> None:
    from enclave.attestation.certs import signed_by

    arks = roots.amd_arks()
    for intermediate in roots.amd_intermediates():
        assert any(signed_by(intermediate, ark) for ark in arks), intermediate.subject
