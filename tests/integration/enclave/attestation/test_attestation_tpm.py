"""TPM evidence against a real swtpm whose EK certificates a local CA issued.

The appliance side (enclave.attestation.tpm.TpmAttester over a TpmKey) makes the evidence; the
pure verifier side checks it; each refusal has its own code. A second TPM under another CA, a
credential made for another AK, a tampered quote and a duplicable key certified by the real AK
are all refused.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from paygate_dev.stack import Swtpm

from enclave import KeyBackendError
from enclave.attestation import binding
from enclave.attestation import tpm as att
from enclave.attestation.base import Verdict
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


def _tpm_evidence(attester: att.TpmAttester, bound: binding.Binding) -> dict[str, object]:
    """The ``tpm`` entry the appliance sends (paygate.server.attestation), from the real TPM."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    code = bytes.fromhex(bound.code_digest.removeprefix("sha256:"))
    attester.extend_app_pcr(att.app_digest(code, bound.config_digest()))
    quote, pcrs = attester.quote(bound.digest())
    return {
        "ek_certificates": {k: b64(v) for k, v in attester.ek_certificates().items()},
        "ak_public": b64(attester.ak_public),
        "certify": {
            name: {
                "public": b64(c.public),
                "attest": b64(c.certify.attest),
                "signature": b64(c.certify.signature),
            }
            for name, c in attester.certify_keys().items()
        },
        "quote": {"attest": b64(quote.attest), "signature": b64(quote.signature)},
        "pcrs": {str(i): v.hex() for i, v in sorted(pcrs.items())},
    }


def _bound(key: TpmKey) -> binding.Binding:
    return binding.Binding(
        nonce=os.urandom(32),
        sealing_key=key.public_key,
        receipt_key=key.receipt_public_key,
        models=(),
        payment=None,
        gateway_version="0.1.0",
        code_digest="sha256:" + "ef" * 32,
        issued_at=1_700_000_000,
    )


def test_verifier_passes_real_evidence_only_when_the_tpm_answers_the_challenge(
    attester: att.TpmAttester, key: TpmKey, ek_ca: EkCa
) -> None:
    bound = _bound(key)
    evidence = _tpm_evidence(attester, bound)
    verifier = att.TpmVerifier(_trusted(ek_ca))

    def run(answer: Callable[[att.CredentialChallenge], att.ActivationAnswer]) -> Verdict:
        flow = verifier.verify(evidence, at=now(), binding=bound)
        challenge = next(flow)
        with pytest.raises(StopIteration) as done:
            flow.send(answer(challenge))
        verdict: Verdict = done.value.value
        return verdict

    def by_the_tpm(c: att.CredentialChallenge) -> att.ActivationAnswer:
        return att.ActivationAnswer(attester.activate(c.ek, c.credential_blob, c.encrypted_secret))

    verdict = run(by_the_tpm)
    assert verdict.ok, verdict.to_json()
    assert [c.name for c in verdict.checks] == [
        "ek_chain", "ak", "activation", "quote", "app_pcr", "pcrs",
        "certify_sealing_key", "certify_receipt_key",
    ]  # fmt: skip
    # Another secret (an appliance without this TPM), or a busy one: refused, nothing after.
    wrong = run(lambda c: att.ActivationAnswer(os.urandom(32), "HTTP 200"))
    assert (wrong.code, wrong.checks[-1].name) == (att.ACTIVATION_FAILED, "activation")
    busy = run(lambda c: att.ActivationAnswer(None, "HTTP 503", busy=True))
    assert busy.code == att.EVIDENCE_UNAVAILABLE
    # Evidence quoted over another binding document: the quote check refuses it.
    other = verifier.verify(evidence, at=now(), binding=_bound(key))
    challenge = next(other)
    with pytest.raises(StopIteration) as done:
        other.send(by_the_tpm(challenge))
    assert done.value.value.code == att.QUOTE_INVALID


@pytest.mark.parametrize("evidence", [None, [], {"ek_certificates": "x"}, {"ek_certificates": {}}])
def test_verifier_refuses_malformed_evidence_without_a_challenge(
    evidence: object, key: TpmKey, ek_ca: EkCa
) -> None:
    flow = att.TpmVerifier(_trusted(ek_ca)).verify(evidence, at=now(), binding=_bound(key))
    with pytest.raises(StopIteration) as done:
        next(flow)
    verdict = done.value.value
    assert not verdict.ok
    assert verdict.checks[-1].name == "ek_chain"
    assert verdict.code in (att.EVIDENCE_MALFORMED, att.EK_UNTRUSTED)
