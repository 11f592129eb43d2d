"""Key epochs in hardware: each epoch's keys are made in the TPM (swtpm) or the PKCS#11 token
(SoftHSM2), certified by the TPM's AK, and destroyed when retired — after which a request
sealed to that epoch cannot be opened by anything the appliance holds. A TPM gateway with key
epochs attests every live epoch, and the client checks each certification."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.stack import SoftHsmToken, Swtpm

import enclave
from enclave import DecryptionError, KeyBackendError
from enclave.errors import KeyNotFound
from enclave.keys.epochs import EpochKeys, EpochRetired
from enclave.keys.pkcs11 import Pkcs11Key
from enclave.keys.pkcs11_epochs import Pkcs11EpochVault
from enclave.keys.tpm import TpmKey
from enclave.keys.tpm_epochs import HANDLE_BASE, HANDLE_COUNT, STATE_FILE, TpmEpochVault
from paygate import release
from paygate.client import AttestationPolicy, ClientError, PaygateTransport
from paygate.server.epochs import request_rotation
from tests.fixtures.attestation_support import Middlebox, edit_evidence
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.payment_support import CHAT, CHAT_BODY
from tests.fixtures.swtpm import EkCa

BODY = json.dumps(CHAT_BODY).encode()
LONG_LIVED = {"ecdh", "ak", "receipt", "log"}  # the wrapped blobs of the long-lived keys


def _sealed_to(epochs: EpochKeys) -> tuple[str, bytes]:
    current = epochs.current
    blob = enclave.seal_v2(
        current.sealing_key, BODY, method="POST", path=CHAT, key_id=current.id
    ).blob
    return current.id, blob


def _retire_first(epochs: EpochKeys) -> None:
    epochs.rotate()  # the first becomes previous
    epochs.rotate()  # and is retired at once: an older previous epoch never lingers


@pytest.fixture
def tpm_base(swtpm_factory: Callable[[], Swtpm], tmp_path: Path) -> Iterator[TpmKey]:
    tpm = swtpm_factory()
    with TpmKey.generate(tpm.tcti, tmp_path / "tpm-key") as key:
        yield key


def test_a_destroyed_tpm_epoch_cannot_open_its_requests(tpm_base: TpmKey) -> None:
    vault = TpmEpochVault(tpm_base)
    epochs = EpochKeys(
        vault, replica="r1", epoch_seconds=3600, grace_seconds=60, base=tpm_base, close_base=False
    )
    try:
        key_id, blob = _sealed_to(epochs)
        first = epochs.lookup(key_id)
        assert first.key is not None
        handles = dict(first.key.handles)  # type: ignore[attr-defined]
        assert all(vault.present(h) for h in handles.values())
        opened = enclave.open_v2(first.key, blob, method="POST", path=CHAT)
        assert opened.body == BODY
        # The AK certified both keys when they were made: non-duplicable TPM keys.
        assert set(first.evidence) == {"sealing", "receipt"}
        # No file holds a private part of an epoch key: only the long-lived keys' wrapped
        # blobs (useless outside this TPM) and the handle list.
        names = {p.name for p in tpm_base.key_dir.iterdir()}
        assert names - {f"{n}.{e}" for n in LONG_LIVED for e in ("pub", "priv")} <= {
            STATE_FILE,
            "app-pcr.lock",
        }
        state = json.loads((tpm_base.key_dir / STATE_FILE).read_text())
        assert set(handles.values()) <= set(state["handles"])

        held = first.key
        _retire_first(epochs)
        # Evicted from the TPM's NV: the only copy is gone.
        assert not any(vault.present(h) for h in handles.values())
        with pytest.raises(KeyBackendError):
            enclave.open_v2(held, blob, method="POST", path=CHAT)
        with pytest.raises(EpochRetired):
            epochs.lookup(key_id)
        # Not even a fresh handle to the same persistent slot reaches a key.
        from tpm2_pytss import TSS2_Exception

        with tpm_base.tpm_access() as tpm, pytest.raises(TSS2_Exception):
            tpm.esapi.tr_from_tpmpublic(handles["sealing"])
        # Neither the current nor any other key of this appliance opens it.
        for live in epochs.live():
            assert live.key is not None
            with pytest.raises(DecryptionError):
                enclave.open_v2(live.key, blob, method="POST", path=CHAT)
        with pytest.raises(DecryptionError):
            enclave.open_v2(tpm_base, blob, method="POST", path=CHAT)
    finally:
        epochs.close()
    assert json.loads((tpm_base.key_dir / STATE_FILE).read_text())["handles"] == []


def test_a_crashed_runs_tpm_epochs_are_swept_at_start(tpm_base: TpmKey) -> None:
    vault = TpmEpochVault(tpm_base)
    leftover = vault.create("1")  # a run that died without closing
    handles = list(leftover.handles.values())
    assert all(vault.present(h) for h in handles)
    epochs = EpochKeys(
        vault, replica="r1", epoch_seconds=3600, grace_seconds=60, base=tpm_base, close_base=False
    )
    try:
        assert epochs.swept == 2
        # What the TPM holds in the epoch range is the new epoch's two keys, nothing older.
        current = epochs.current.key
        assert current is not None
        held = {h for h in range(HANDLE_BASE, HANDLE_BASE + HANDLE_COUNT) if vault.present(h)}
        assert held == set(current.handles.values())  # type: ignore[attr-defined]
        assert current.public_key != leftover.public_key
        assert len(handles) == 2
    finally:
        epochs.close()


def test_a_destroyed_pkcs11_epoch_cannot_open_its_requests(softhsm_token: SoftHsmToken) -> None:
    token = softhsm_token
    base = Pkcs11Key.generate(token.module_path, token.token_label, token.pin, "paygate")
    vault = Pkcs11EpochVault(token.module_path, token.token_label, token.pin, "paygate")
    epochs = EpochKeys(vault, replica="r1", epoch_seconds=3600, grace_seconds=60, base=base)
    try:
        key_id, blob = _sealed_to(epochs)
        first = epochs.lookup(key_id)
        held = first.key
        assert isinstance(held, Pkcs11Key)
        label = held.info().label
        assert enclave.open_v2(held, blob, method="POST", path=CHAT).body == BODY
        assert {label, label + "-receipt"} <= vault.labels()
        _retire_first(epochs)
        # C_DestroyObject: no object with the epoch's labels is left on the token.
        assert not {label, label + "-receipt"} & vault.labels()
        with pytest.raises(KeyNotFound):
            Pkcs11Key.open(token.module_path, token.token_label, token.pin, label)
        with pytest.raises(KeyBackendError):
            enclave.open_v2(held, blob, method="POST", path=CHAT)
        for candidate in [*(e.key for e in epochs.live()), base]:
            assert candidate is not None
            with pytest.raises(DecryptionError):
                enclave.open_v2(candidate, blob, method="POST", path=CHAT)
    finally:
        epochs.close()
    assert vault.labels() == set()


# --- a TPM gateway with key epochs, attested ----------------------------------------------


@pytest.fixture
def ek_tpm_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path: Path
) -> Iterator[TpmKey]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path / "tpm-key") as key:
        yield key


def _tpm_gateway(key: TpmKey, tmp_path: Path, **extra: Any) -> ThreadedStack:
    return ThreadedStack(
        key=key,
        key_backend="tpm",
        attestation="tpm",
        key_epoch=60,
        key_epoch_grace=30,
        key_epoch_dir=tmp_path / "epochs",
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
        **extra,
    )


def _tpm_policy(ek_ca: EkCa) -> AttestationPolicy:
    return AttestationPolicy.from_files(ek_ca.chain_pem, code_digests={release.code_digest()})


def test_a_tpm_gateway_attests_every_live_epoch(
    ek_tpm_key: TpmKey, ek_ca: EkCa, tmp_path: Path
) -> None:
    with _tpm_gateway(ek_tpm_key, tmp_path) as stack:
        request_rotation(tmp_path / "epochs", 20.0)  # two live epochs: both certified
        transport = PaygateTransport(envelope="v2", attestation=_tpm_policy(ek_ca))
        with httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client:
            reply = client.post(CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
        attested = transport.attested(stack.url)
        assert attested is not None
        assert len(attested.binding.epochs) == 2
        passed = {c.name for c in attested.checks if c.status == "pass"}
        for epoch in attested.binding.epochs:
            assert f"certify_epoch_{epoch.id}_sealing_key" in passed
            assert f"certify_epoch_{epoch.id}_receipt_key" in passed
        assert "app_pcr" in passed  # PCR 23 still measures the configuration across rotations


def test_an_epoch_key_the_tpm_did_not_certify_is_refused_before_sealing(
    ek_tpm_key: TpmKey, ek_ca: EkCa, tmp_path: Path
) -> None:
    with _tpm_gateway(ek_tpm_key, tmp_path) as stack:
        request_rotation(tmp_path / "epochs", 20.0)

        def swap(document: dict[str, Any]) -> None:
            # The previous epoch's certification offered for the current epoch's key.
            certs = document["tpm"]["epochs"]
            current, previous = (e["id"] for e in document["binding"]["epochs"])
            certs[current] = certs[previous]

        transport = PaygateTransport(
            transport=Middlebox(edit_evidence(swap)), envelope="v2", attestation=_tpm_policy(ek_ca)
        )
        with (
            httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client,
            pytest.raises(ClientError) as caught,
        ):
            client.post(CHAT, json=CHAT_BODY)
        assert caught.value.code == "key_not_certified"
        assert sum(stack.fake.hits.values()) == 0
