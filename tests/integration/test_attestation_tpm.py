"""TPM evidence against a real swtpm whose EK certificates a local CA issued.

The appliance side (enclave.attestation.tpm.TpmAttester over a TpmKey) makes the evidence; the
pure verifier side checks it; each refusal has its own code. A second TPM under another CA, a
credential made for another AK, a tampered quote and a duplicable key certified by the real AK
are all refused.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from paygate_dev.stack import Swtpm

from enclave import KeyBackendError
from enclave.attestation import tpm as att
from enclave.keys.tpm import TpmKey
from tests.fixtures.swtpm import EkCa


def _trusted(ca: EkCa) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(ca.chain_pem.read_bytes())


def now() -> datetime:
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def tpm(ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa) -> Swtpm:
    return ek_swtpm_factory(ek_ca)


@pytest.fixture(scope="module")
def key(tpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmKey]:
    with TpmKey.generate(tpm.tcti, tmp_path_factory.mktemp("k") / "key") as opened:
        yield opened


@pytest.fixture(scope="module")
def attester(key: TpmKey) -> att.TpmAttester:
    return att.TpmAttester(key)


def _ek_public(attester: att.TpmAttester, kind: str) -> x509.Certificate:
    return x509.load_der_x509_certificate(attester.ek_certificates()[kind])


def test_ek_certificates_from_nv_chain_to_the_local_ca(
    attester: att.TpmAttester, ek_ca: EkCa
) -> None:
    certs = attester.ek_certificates()
    assert set(certs) == {"rsa2048", "p256", "p384"}
    for der in certs.values():
        att.verify_ek_chain(der, _trusted(ek_ca), now())


def test_ek_of_another_ca_is_untrusted(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], rogue_ek_ca: EkCa, ek_ca: EkCa, tmp_path: Path
) -> None:
    rogue = ek_swtpm_factory(rogue_ek_ca)
    with TpmKey.generate(rogue.tcti, tmp_path / "k") as other:
        der = att.TpmAttester(other).ek_certificates()["p256"]
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.verify_ek_chain(der, _trusted(ek_ca), now())
    assert caught.value.code == att.EK_UNTRUSTED
    # Only the root, without the intermediate that issued the EK certificates: no chain either.
    root_only = [c for c in _trusted(ek_ca) if c.issuer == c.subject]
    with pytest.raises(att.TpmEvidenceError):
        att.verify_ek_chain(
            att.TpmAttester(TpmKey.open(rogue.tcti, tmp_path / "k")).ek_certificates()["p256"],
            root_only,
            now(),
        )


@pytest.mark.parametrize("ek", ["p256", "rsa2048"])
def test_credential_activation_recovers_the_secret(attester: att.TpmAttester, ek: str) -> None:
    ak = att.check_ak(attester.ak_public)
    secret = os.urandom(32)
    blob, encrypted = att.make_credential(_ek_public(attester, ek).public_key(), ak.name, secret)
    assert attester.activate(ek, blob, encrypted) == secret


def test_credential_for_another_ak_is_refused(attester: att.TpmAttester, key: TpmKey) -> None:
    # The receipt key is in the same TPM, but it is not the AK: the TPM checks the Name.
    other = att.parse_public(key.public_blob("receipt"))
    blob, encrypted = att.make_credential(
        _ek_public(attester, "p256").public_key(), other.name, os.urandom(32)
    )
    with pytest.raises(KeyBackendError):
        attester.activate("p256", blob, encrypted)


def test_quote_verifies_and_binds_qualifying_data(attester: att.TpmAttester) -> None:
    digest = att.app_digest(hashlib.sha256(b"code").digest(), hashlib.sha256(b"config").digest())
    attester.extend_app_pcr(digest)
    qualifying = hashlib.sha256(b"binding").digest()
    quote, pcrs = attester.quote(qualifying)
    ak = att.check_ak(attester.ak_public)
    att.check_quote(ak, quote, pcrs, qualifying)
    assert sorted(pcrs) == list(att.DEFAULT_PCRS)
    assert pcrs[att.APP_PCR] == att.app_pcr_value(digest)
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.check_quote(ak, quote, pcrs, hashlib.sha256(b"other").digest())
    assert caught.value.code == att.QUOTE_INVALID
    flipped = bytearray(quote.attest)
    flipped[-1] ^= 1
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.check_quote(ak, att.SignedAttest(bytes(flipped), quote.signature), pcrs, qualifying)
    assert caught.value.code == att.QUOTE_INVALID
    lied = {**pcrs, 0: b"\x01" * 32}
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.check_quote(ak, quote, lied, qualifying)
    assert caught.value.code == att.QUOTE_INVALID


def test_certify_of_the_sealing_and_receipt_keys(attester: att.TpmAttester, key: TpmKey) -> None:
    ak = att.check_ak(attester.ak_public)
    certified = attester.certify_keys()
    att.check_certified(ak, certified["sealing"], key.public_key, "sealing key")
    att.check_certified(ak, certified["receipt"], key.receipt_public_key, "receipt key")
    # The sealing key's certification offered for another key: refused.
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.check_certified(ak, certified["sealing"], key.receipt_public_key, "sealing key")
    assert caught.value.code == att.KEY_NOT_CERTIFIED
    # Another key's public area with the sealing key's certification: the Name differs.
    swapped = att.CertifiedKey(certified["receipt"].public, certified["sealing"].certify)
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.check_certified(ak, swapped, key.receipt_public_key, "sealing key")
    assert caught.value.code == att.KEY_NOT_CERTIFIED


def test_duplicable_key_certified_by_the_real_ak_is_refused(key: TpmKey) -> None:
    """A key without fixedTPM/fixedParent that the genuine AK did certify: key_not_certified."""
    from tpm2_pytss import TPM2_ALG, TPMA_OBJECT, TPMT_SIG_SCHEME

    from enclave.keys.tpm import _create_primary, ecdh_key_template

    template = ecdh_key_template()
    template.publicArea.objectAttributes &= ~(TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT)
    with key.tpm_access() as tpm:
        primary = _create_primary(tpm.esapi, tpm.tcti)
        try:
            private, public = tpm.esapi.create(primary, None, template)[:2]
            handle = tpm.esapi.load(primary, private, public)
        finally:
            tpm.esapi.flush_context(primary)
        try:
            with tpm.loaded("ak") as ak_handle:
                attest, signature = tpm.esapi.certify(
                    handle, ak_handle, b"", TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
                )
        finally:
            tpm.esapi.flush_context(handle)
    from enclave.attestation.tpm import _signed

    certified = att.CertifiedKey(bytes(public.marshal()), _signed(attest, signature))
    point = att.parse_public(certified.public).point
    ak = att.check_ak(key.public_blob("ak"))
    with pytest.raises(att.TpmEvidenceError) as caught:
        att.check_certified(ak, certified, point, "sealing key")
    assert caught.value.code == att.KEY_NOT_CERTIFIED
    assert "fixedTPM" in str(caught.value)


def test_receipt_key_signs_in_the_tpm(key: TpmKey) -> None:
    digest = hashlib.sha256(b"receipt").digest()
    signature = key.sign_digest(digest)
    assert att.verify_signature(key.receipt_public_key, b"receipt", signature)
    assert not att.verify_signature(key.public_key, b"receipt", signature)


def test_a_key_directory_without_attestation_keys_gets_them_on_open(
    swtpm: Swtpm, tmp_path: Path
) -> None:
    tpm = swtpm  # a TPM of its own: swtpm has three object slots and the module's key holds one
    directory = tmp_path / "old"
    with TpmKey.generate(tpm.tcti, directory):
        pass
    for name in ("ak.pub", "ak.priv", "receipt.pub", "receipt.priv"):
        (directory / name).unlink()
    with TpmKey.open(tpm.tcti, directory) as upgraded:
        assert (directory / "ak.pub").exists()
        assert (directory / "receipt.priv").stat().st_mode & 0o777 == 0o600
        assert len(upgraded.sign_digest(b"\x00" * 32)) == 64
