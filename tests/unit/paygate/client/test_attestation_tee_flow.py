"""Nitro evidence through the appliance's AttestationService (NSM-shaped stand-in transport,
the real NsmProvider) and the client's attestation flow: nonce, user_data = SHA-256 of the
binding document and public_key = the sealing key's SPKI are read back by the real verifier;
the stand-in's chain is refused under the pinned AWS root and accepted under its own root."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from enclave.attestation.nitro import NitroPolicy
from enclave.attestation.providers.nsm import NsmProvider
from enclave.keys.tee_memory import TeeMemoryKey
from paygate.client.attestation import AttestationPolicy, Attested, TeePolicy, attestation_flow
from paygate.client.errors import AttestationRefused
from paygate.server.attestation import AttestationConfig, AttestationService
from tests.fixtures.attestation_standins import StandInNitroPki, StandInNsm

ORIGIN = "http://appliance.test"


def _service(key: TeeMemoryKey, pki: StandInNitroPki) -> AttestationService:
    config = AttestationConfig("nitro", (), None, "0.1.0", "sha256:" + "00" * 32)
    nsm = StandInNsm(pki, lambda: datetime.now(UTC))
    return AttestationService(config, key, provider=NsmProvider(nsm))


def _attest(service: AttestationService, policy: AttestationPolicy, key: bytes) -> Attested:
    flow = attestation_flow(ORIGIN, policy, key)
    exchange = next(flow)
    nonce = bytes.fromhex(parse_qs(urlsplit(exchange.url).query)["nonce"][0])
    try:
        flow.send((200, json.dumps(service.evidence(nonce)).encode()))
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the TEE flow has one exchange")


def test_nitro_evidence_binds_and_is_verified_against_the_given_root() -> None:
    pki = StandInNitroPki.make(not_before=datetime.fromtimestamp(time.time() - 60, UTC))
    with TeeMemoryKey.generate() as key:
        service = _service(key, pki)
        with pytest.raises(AttestationRefused) as caught:
            _attest(
                service, AttestationPolicy(tee={"nitro": TeePolicy(NitroPolicy())}), key.public_key
            )
        assert caught.value.code == "untrusted_root", str(caught.value)
        passed = {c.name for c in caught.value.checks if c.status == "pass"}  # type: ignore[attr-defined]
        assert {"nonce", "user_data", "public_key", "document_signature"} <= passed

        own = AttestationPolicy(tee={"nitro": TeePolicy(NitroPolicy(), roots=(pki.root,))})
        attested = _attest(service, own, key.public_key)
        assert attested.kind == "nitro"
        assert attested.binding.sealing_key == key.public_key

        other = _service(key, pki)
        with TeeMemoryKey.generate() as stranger:
            # Another key's binding: the document's public_key and user_data name the real one.
            with pytest.raises(AttestationRefused) as caught:
                _attest(other, own, stranger.public_key)
            assert caught.value.code == "key_not_certified"


def test_an_appliance_without_a_provider_gives_no_tee_evidence() -> None:
    from enclave.attestation.providers import EvidenceUnavailable

    config = AttestationConfig("sev-snp", (), None, "0.1.0", "sha256:" + "00" * 32)
    with TeeMemoryKey.generate() as key, pytest.raises(EvidenceUnavailable):
        AttestationService(config, key).evidence(b"\0" * 32)
