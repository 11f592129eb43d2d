"""Evidence providers against stand-ins for the hardware (a configfs-tsm-shaped directory, the
SEV guest driver's and the NSM's message formats): the real parsers and verifiers read the
binding back out of what the providers produce. And the tee-memory key backend."""

from __future__ import annotations

import hashlib
import struct
from datetime import UTC, datetime
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from enclave.attestation.base import ExpectedBinding
from enclave.attestation.nitro import NitroVerifier, parse_document
from enclave.attestation.providers import EvidenceProvider, EvidenceUnavailable, open_provider
from enclave.attestation.providers.configfs_tsm import ConfigfsTsmProvider
from enclave.attestation.providers.nsm import NsmProvider
from enclave.attestation.providers.sev_guest import SevGuestProvider
from enclave.attestation.sev_snp import GUID_VCEK, SevSnpVerifier, SnpTcb, parse_report
from enclave.attestation.tdx import TdxVerifier, parse_quote
from enclave.keys.base import KeyBackend
from enclave.keys.tee_memory import TeeMemoryKey
from tests.fixtures.attestation_standins import (
    FIXTURES,
    StandInAmdPki,
    StandInConfigfsTsm,
    StandInNitroPki,
    StandInNsm,
    cert_table,
    snp_report,
)

BINDING_DOC = b'{"nonce":"...","sealing_key":"...","payment_terms":"..."}'  # shape only
DIGEST = hashlib.sha512(BINDING_DOC).digest()
TCB = SnpTcb(bootloader=3, tee=0, snp=8, microcode=115)
CHIP = bytes(range(64))
PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module")
def amd() -> StandInAmdPki:
    return StandInAmdPki.make()


@pytest.fixture(scope="module")
def vcek_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def test_configfs_tsm_sev_snp_report_carries_the_binding(tmp_path: Path, amd, vcek_key) -> None:
    vcek = amd.vcek(vcek_key, hwid=CHIP, tcb=TCB)

    def firmware(inblob: bytes) -> tuple[bytes, bytes]:
        report = snp_report(vcek_key, report_data=inblob, chip_id=CHIP, tcb=TCB)
        return report, cert_table({GUID_VCEK: vcek.public_bytes(serialization.Encoding.DER)})

    standin = StandInConfigfsTsm(tmp_path / "tsm", "sev_guest", firmware)
    provider = ConfigfsTsmProvider(tmp_path / "tsm", timeout=10)
    assert isinstance(provider, EvidenceProvider)
    with standin.running():
        got = provider.attest(ExpectedBinding(report_data=DIGEST))
    assert (got.kind, got.source, standin.served) == ("sev-snp", "configfs-tsm:sev_guest", 1)
    assert parse_report(got.evidence).report_data == DIGEST
    verifier = SevSnpVerifier(
        certificates=[*got.certificates, amd.ask.public_bytes(PEM) + amd.ark.public_bytes(PEM)],
        roots=[amd.ark],
    )
    v = verifier.verify(got.evidence, at=datetime.now(UTC), binding=ExpectedBinding(DIGEST))
    assert v.ok, v.to_json()
    other = verifier.verify(
        got.evidence,
        at=datetime.now(UTC),
        binding=ExpectedBinding(hashlib.sha512(b"other").digest()),
    )
    assert other.code == "report_data_mismatch"


def test_configfs_tsm_tdx_quote_carries_the_binding(tmp_path: Path) -> None:
    sample = (FIXTURES / "tdx" / "quote_v4_spr_e4.dat").read_bytes()

    def tdx_module(inblob: bytes) -> tuple[bytes, bytes]:
        # The stand-in splices report_data into a real quote's TD body: the quote then no
        # longer verifies (no TDX module here to sign it), but it parses like a real one.
        return sample[: 48 + 520] + inblob + sample[48 + 584 :], b""

    standin = StandInConfigfsTsm(tmp_path / "tsm", "tdx_guest", tdx_module)
    with standin.running():
        got = ConfigfsTsmProvider(tmp_path / "tsm").attest(ExpectedBinding(report_data=DIGEST))
    assert got.kind == "tdx"
    assert parse_quote(got.evidence).body["report_data"] == DIGEST
    v = TdxVerifier().verify(
        got.evidence,
        at=datetime(2023, 7, 1, tzinfo=UTC),
        binding=ExpectedBinding(report_data=DIGEST),
    )
    status = {c.name: c.status for c in v.checks}
    assert (status["report_data"], status["quote_signature"]) == ("pass", "fail")


def test_configfs_tsm_without_the_interface_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EvidenceUnavailable, match="no configfs-tsm") as err:
        ConfigfsTsmProvider(tmp_path / "absent").attest(ExpectedBinding(report_data=DIGEST))
    assert err.value.code == "evidence_unavailable"
    with pytest.raises(EvidenceUnavailable, match="64 bytes"):
        ConfigfsTsmProvider(tmp_path).attest(ExpectedBinding(report_data=bytes(65)))


def test_configfs_tsm_that_never_answers_times_out(tmp_path: Path) -> None:
    (tmp_path / "report").mkdir()
    with pytest.raises(EvidenceUnavailable, match="timed out"):
        ConfigfsTsmProvider(tmp_path, timeout=0.2).attest(ExpectedBinding(report_data=DIGEST))


class StandInSevGuestDriver:
    """The SEV guest driver's SNP_GET_EXT_REPORT message formats, answered by stand-in keys."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, vcek_der: bytes, status: int = 0):
        self.key, self.vcek_der, self.status = key, vcek_der, status

    def get_ext_report(self, request: bytes) -> tuple[bytes, bytes]:
        user_data, vmpl = struct.unpack_from("<64sI", request)
        assert len(request) == 96
        assert vmpl == 0
        report = snp_report(self.key, report_data=user_data, chip_id=CHIP, tcb=TCB)
        response = struct.pack("<II24x", self.status, len(report)) + report
        return response.ljust(4000, b"\0"), cert_table({GUID_VCEK: self.vcek_der})


def test_sev_guest_report_carries_the_binding(amd, vcek_key) -> None:
    der = amd.vcek(vcek_key, hwid=CHIP, tcb=TCB).public_bytes(serialization.Encoding.DER)
    got = SevGuestProvider(StandInSevGuestDriver(vcek_key, der)).attest(ExpectedBinding(DIGEST))
    assert parse_report(got.evidence).report_data == DIGEST
    v = SevSnpVerifier(
        certificates=[*got.certificates, amd.ask.public_bytes(PEM), amd.ark.public_bytes(PEM)],
        roots=[amd.ark],
    ).verify(got.evidence, at=datetime.now(UTC), binding=ExpectedBinding(DIGEST))
    assert v.ok, v.to_json()

    class BrokenTable(StandInSevGuestDriver):
        def get_ext_report(self, request: bytes) -> tuple[bytes, bytes]:
            response, _ = super().get_ext_report(request)
            return response, b"\x01" * 16 + b"\xff" * 8  # an entry pointing past the table

    with pytest.raises(EvidenceUnavailable, match="certificate table"):
        SevGuestProvider(BrokenTable(vcek_key, der)).attest(ExpectedBinding(DIGEST))
    with pytest.raises(EvidenceUnavailable, match="firmware status 0x16"):
        SevGuestProvider(StandInSevGuestDriver(vcek_key, der, status=0x16)).attest(
            ExpectedBinding(DIGEST)
        )


def test_nsm_document_carries_nonce_user_data_and_sealing_key() -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    pki = StandInNitroPki.make(not_before=now.replace(minute=0, second=0))
    key = TeeMemoryKey.generate()
    binding = ExpectedBinding(
        nonce=b"\x07" * 32,
        user_data=hashlib.sha256(BINDING_DOC).digest(),
        public_key=key.public_key_spki(),
    )
    nsm = StandInNsm(pki, clock=lambda: now)
    got = NsmProvider(nsm).attest(binding)
    assert (got.kind, nsm.requests) == ("nitro", 1)
    doc = parse_document(got.evidence)
    assert (doc.nonce, doc.user_data, doc.public_key) == (
        binding.nonce,
        binding.user_data,
        binding.public_key,
    )
    v = NitroVerifier(roots=(pki.root,)).verify(got.evidence, at=now, binding=binding)
    assert v.ok, v.to_json()
    swapped = ExpectedBinding(public_key=TeeMemoryKey.generate().public_key_spki())
    assert (
        NitroVerifier(roots=(pki.root,)).verify(got.evidence, at=now, binding=swapped).code
        == "public_key_mismatch"
    )


def test_nsm_refusals_and_limits() -> None:
    class Refusing:
        def exchange(self, request: bytes) -> bytes:
            return cbor2.dumps({"Error": "InvalidArgument"})

    with pytest.raises(EvidenceUnavailable, match="InvalidArgument"):
        NsmProvider(Refusing()).attest(ExpectedBinding(nonce=b"n"))
    with pytest.raises(EvidenceUnavailable, match="longer"):
        NsmProvider(Refusing()).attest(ExpectedBinding(user_data=bytes(513)))


def test_tee_memory_key_is_a_key_backend_that_keeps_nothing() -> None:
    key = TeeMemoryKey.generate()
    peer = TeeMemoryKey.generate()
    assert isinstance(key, KeyBackend)
    assert key.ecdh(peer.public_key) == peer.ecdh(key.public_key)
    info = key.info()
    assert (info.backend, info.persistent) == ("tee-memory", False)
    assert key.public_key.hex()[:18] in repr(key)
    with key:
        pass
    with pytest.raises(Exception, match="closed"):
        key.ecdh(peer.public_key)


def test_open_provider_picks_the_interface_the_machine_has(tmp_path: Path) -> None:
    (tmp_path / "tsm" / "report").mkdir(parents=True)
    (tmp_path / "sev-guest").touch()
    (tmp_path / "nsm").touch()
    paths = {
        "configfs_root": str(tmp_path / "tsm"),
        "sev_guest_device": str(tmp_path / "sev-guest"),
        "nsm_device": str(tmp_path / "nsm"),
    }
    assert isinstance(open_provider("tdx", **paths), ConfigfsTsmProvider)
    assert isinstance(open_provider("sev-snp", **paths), ConfigfsTsmProvider)
    assert isinstance(open_provider("nitro", **paths), NsmProvider)
    (tmp_path / "tsm" / "report").rmdir()
    assert isinstance(open_provider("sev-snp", **paths), SevGuestProvider)
    for kind in ("tdx", "tpm"):
        with pytest.raises(EvidenceUnavailable):
            open_provider(kind, **paths)


def test_paygate_builds_the_tee_memory_backend_and_never_creates_one(monkeypatch) -> None:
    from paygate.config import ConfigError, load_settings
    from paygate.keys import create_key, open_key_backend

    monkeypatch.delenv("PAYGATE_KEY_BACKEND", raising=False)
    settings = load_settings(None, key_backend="tee-memory")
    first, second = open_key_backend(settings), open_key_backend(settings)
    assert (first.info().backend, first.info().persistent) == ("tee-memory", False)
    assert first.public_key != second.public_key  # a new key every start, nothing kept
    first.close()
    second.close()
    with pytest.raises(ConfigError, match="never stored"):
        create_key(settings)
