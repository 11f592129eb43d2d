"""The log key in hardware: ECDSA P-256 (signed-note type 0x02) in the TPM, certified by the AK
in the attestation, and in a PKCS#11 token; checkpoints any type-0x02 verifier accepts.

The TPM gateway is verified by the real client with an EK CA policy and a log policy: the
evidence's certification of the log key is checked, then the checkpoint under that key.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from paygate_dev.stack import SoftHsmToken, Swtpm

from enclave.keys.pkcs11 import Pkcs11Key
from enclave.keys.tpm import TpmKey
from enclave.tlog import checkpoint as cp
from enclave.tlog import note
from paygate.client import AsyncPaygateTransport, AttestationPolicy
from paygate.client.tlog import LogPolicy, LogState
from paygate.tlog.service import log_identity
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.swtpm import EkCa

ORIGIN = "tpm.test/v1/log"
CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def tpm_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[TpmKey]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path_factory.mktemp("tpm") / "key") as key:
        yield key


def test_tpm_log_key_signs_type_0x02_checkpoints(tpm_key: TpmKey) -> None:
    verifier = note.parse_vkey(log_identity(ORIGIN, tpm_key).key)
    assert isinstance(verifier, note.EcdsaVerifier)
    signed = note.sign(
        cp.Checkpoint(ORIGIN, 1, b"\1" * 32).text(),
        [note.RawSigner(ORIGIN, verifier.key_id, tpm_key.sign_log)],
    )
    cp.open_checkpoint(signed, [verifier], origin=ORIGIN)
    # Any ECDSA P-256 verifier agrees (ASN.1 DER over SHA-256 of the note text).
    public = serialization.load_der_public_key(tpm_key.log_public_key)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    text, _, line = signed.rpartition("\n\n")
    raw = base64.b64decode(line.split(" ")[2])
    public.verify(raw[4:], (text + "\n").encode(), ec.ECDSA(hashes.SHA256()))
    # The key is the TPM's own: not the receipt key, and the same after reopening.
    assert tpm_key.log_public_key != tpm_key.receipt_public_key


def test_pkcs11_log_key_is_a_third_pair_in_the_token(softhsm_token: SoftHsmToken) -> None:
    args = (softhsm_token.module_path, softhsm_token.token_label, softhsm_token.pin, "envelope")
    with Pkcs11Key.generate(*args) as key:
        vkey = log_identity(ORIGIN, key).key
        verifier = note.parse_vkey(vkey)
        signed = note.sign(
            cp.Checkpoint(ORIGIN, 0, b"\0" * 32).text(),
            [note.RawSigner(ORIGIN, verifier.key_id, key.sign_log)],
        )
        cp.open_checkpoint(signed, [verifier], origin=ORIGIN)
    with Pkcs11Key.open(*args) as again:  # kept in the token: the same key next time
        assert log_identity(ORIGIN, again).key == vkey


async def test_tpm_gateway_log_key_certified_and_checked_by_the_client(
    tpm_key: TpmKey, ek_ca: EkCa, tmp_path: Path
) -> None:
    settings = {
        "key_backend": "tpm",
        "transparency_log": True,
        "log_origin": ORIGIN,
        "ledger_path": tmp_path / "ledger.db",
        "attestation_rate_per_minute": 100_000,
    }
    async with running_stack(key=tpm_key, **settings) as stack:
        state = LogState(tmp_path / "state.json")
        policy = AttestationPolicy.from_files(ek_ca.chain_pem)
        policy = AttestationPolicy(trusted_ek_cas=policy.trusted_ek_cas, log=LogPolicy(state=state))
        transport = AsyncPaygateTransport(attestation=policy)
        async with httpx.AsyncClient(transport=transport, timeout=30) as client:
            response = await client.post(stack.url + "/v1/chat/completions", json=CHAT)
            assert response.status_code == 200
            attested = transport.attested(stack.url)
        assert attested is not None
        names = {c.name: c.status for c in attested.checks}
        assert names["certify_log_key"] == "pass"
        assert names["transparency_log"] == "pass"
        assert state.get(ORIGIN) is not None
        served = await asyncio.to_thread(httpx.get, stack.url + "/v1/log/checkpoint", timeout=10)
        assert served.status_code == 200
        cp.open_checkpoint(served.text, [note.parse_vkey(log_identity(ORIGIN, tpm_key).key)])
