"""Key epochs without hardware: the epoch life cycle (memory vault, a test clock), the keyed v2
envelope, the binding document's epochs and gpu fields, key ids in the key document, the
duration settings, and the NVIDIA policy's minimums and OCSP hook."""

from __future__ import annotations

import asyncio
import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
from cryptography import x509

import enclave
from enclave import DecryptionError, KeyBackendError, SoftwareKey, p256
from enclave.attestation import binding
from enclave.attestation.base import ExpectedBinding
from enclave.attestation.nvidia import NvidiaGpuPolicy, NvidiaGpuVerifier, version_tuple
from enclave.envelope_v2 import request_key_id
from enclave.keys.epochs import (
    EpochKeys,
    EpochRetired,
    MemoryEpochVault,
    WrongReplica,
    key_id_for,
    request_signer,
)
from paygate.client.errors import PubkeyUnavailable
from paygate.client.pubkey import key_id_matches, parse_pubkey_document
from paygate.config import Settings, parse_duration
from tests.fixtures.attestation_standins import StandInGpu

ROUTE = {"method": "POST", "path": "/v1/chat/completions"}


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def _epochs(clock: Clock, epoch: float = 100, grace: float = 10) -> EpochKeys:
    return EpochKeys(
        MemoryEpochVault("software"),
        replica="r1",
        epoch_seconds=epoch,
        grace_seconds=grace,
        clock=clock,
    )


# --- the life of an epoch ----------------------------------------------------------------


def test_rotation_keeps_the_previous_epoch_for_its_grace_then_destroys_it() -> None:
    clock = Clock()
    epochs = _epochs(clock)
    first = epochs.current
    assert first.id == p256.fingerprint(first.sealing_key)[:16] + "@r1"
    assert epochs.public_key == first.sealing_key
    assert not epochs.rotation_due()
    clock.now += 100
    assert epochs.rotation_due()
    second = epochs.rotate()
    assert [e.id for e in epochs.live()] == [second.id, first.id]
    assert first.not_after == clock.now + 10
    assert epochs.lookup(first.id) is first  # in its grace period
    assert epochs.unkeyed() == [second, first]
    clock.now += 10.5
    with pytest.raises(EpochRetired):
        epochs.lookup(first.id)  # past not_after, even before the loop destroys it
    assert epochs.unkeyed() == [second]
    held = first.key
    assert epochs.expire() == [first]
    assert first.key is None
    assert first.retired
    assert held is not None
    with pytest.raises(KeyBackendError):
        held.ecdh(SoftwareKey.generate().public_key)  # destroyed, not just forgotten
    assert [e.id for e in epochs.history()] == [first.id]
    with pytest.raises(EpochRetired):
        epochs.lookup(first.id)
    epochs.close()
    assert second.key is None
    with pytest.raises(KeyBackendError):
        _ = epochs.public_key


def test_a_third_rotation_retires_the_oldest_at_once() -> None:
    clock = Clock()
    epochs = _epochs(clock)
    first = epochs.current
    epochs.rotate()
    epochs.rotate()
    assert len(epochs.live()) == 2
    assert first.retired
    assert first.key is None


def test_a_late_rotation_keeps_serving_the_current_epoch() -> None:
    clock = Clock()
    epochs = _epochs(clock)
    current = epochs.current
    clock.now += 10_000  # the rotation loop failed for a long time
    assert epochs.lookup(current.id) is current
    assert epochs.unkeyed() == [current]


def test_lookup_tells_retired_from_another_replicas_key() -> None:
    epochs = _epochs(Clock())
    with pytest.raises(WrongReplica) as other:
        epochs.lookup("0123456789abcdef@r2")
    assert other.value.replica == "r2"
    assert other.value.code == "wrong_replica"
    with pytest.raises(EpochRetired):
        epochs.lookup("0123456789abcdef@r1")  # ours, but not live: a past epoch
    with pytest.raises(WrongReplica) as nameless:
        epochs.lookup("no-replica-here")
    assert nameless.value.replica is None


@pytest.mark.parametrize(("epoch", "grace"), [(0, 0), (10, 10), (10, -1), (-5, 1)])
def test_an_epoch_is_longer_than_its_grace(epoch: float, grace: float) -> None:
    with pytest.raises(ValueError, match="grace"):
        _epochs(Clock(), epoch, grace)


def test_key_ids_are_bounded_printable_ascii() -> None:
    point = SoftwareKey.generate().public_key
    with pytest.raises(ValueError, match="replica"):
        key_id_for(point, "r" * 300)
    with pytest.raises(ValueError, match="replica"):
        key_id_for(point, "r\n1")


async def test_a_request_is_receipted_by_the_epoch_that_opened_it() -> None:
    clock = Clock()
    epochs = _epochs(clock)
    old = epochs.current
    new = epochs.rotate()
    assert epochs.receipt_public_key == new.receipt_key  # outside a request: current

    async def request(epoch: Any) -> bytes:
        epochs.bind(epoch)
        signer = request_signer(epochs)  # resolved before a worker thread signs
        return await asyncio.to_thread(lambda: signer.receipt_public_key)

    seen = await asyncio.gather(request(old), request(new))
    assert seen == [old.receipt_key, new.receipt_key]
    assert epochs.receipt_public_key == new.receipt_key  # tasks do not leak their epoch
    assert request_signer(SoftwareKey.generate()) is not None


# --- the keyed v2 envelope ---------------------------------------------------------------


def test_keyed_request_round_trip_and_header() -> None:
    key = SoftwareKey.generate()
    sealed = enclave.seal_v2(key.public_key, b"hi", key_id="00aa@r1", **ROUTE)
    assert sealed.blob[:3] == b"\x02\x00\x07"
    assert request_key_id(sealed.blob) == "00aa@r1"
    assert enclave.open_v2(key, sealed.blob, **ROUTE).body == b"hi"
    unkeyed = enclave.seal_v2(key.public_key, b"hi", **ROUTE).blob
    assert request_key_id(unkeyed) is None
    assert unkeyed[1] == 0x04  # enc follows the version byte: unchanged wire format


def test_the_key_id_is_authenticated() -> None:
    key = SoftwareKey.generate()
    blob = bytearray(enclave.seal_v2(key.public_key, b"hi", key_id="00aa@r1", **ROUTE).blob)
    blob[4] ^= 1  # "00aa" -> another id of the same length
    with pytest.raises(DecryptionError):
        enclave.open_v2(key, bytes(blob), **ROUTE)
    stripped = b"\x02" + bytes(blob[10:])  # the header removed: the info no longer matches
    with pytest.raises(DecryptionError):
        enclave.open_v2(key, stripped, **ROUTE)


@pytest.mark.parametrize(
    "blob",
    [
        b"\x02\x00",
        b"\x02\x00\x00" + b"\x04" * 200,  # zero-length id
        b"\x02\x00\x09abc",  # runs past the end
        b"\x02\x00\x02\xff\xfe" + b"\x04" * 200,  # not ASCII
        b"\x02\x00\x02\x01\x02" + b"\x04" * 200,  # not printable
    ],
)
def test_malformed_keyed_headers_are_the_uniform_failure(blob: bytes) -> None:
    with pytest.raises(DecryptionError):
        request_key_id(blob)
    with pytest.raises(DecryptionError):
        enclave.open_v2(SoftwareKey.generate(), blob, **ROUTE)


@pytest.mark.parametrize("key_id", ["", "x" * 256, "é@r1", "a\nb"])
def test_sealing_refuses_a_bad_key_id(key_id: str) -> None:
    with pytest.raises(ValueError, match="key id"):
        enclave.seal_v2(SoftwareKey.generate().public_key, b"", key_id=key_id, **ROUTE)


# --- the binding document ----------------------------------------------------------------


_GPU = {"evidence_digest": "sha256:" + "1" * 64, "certificates_digest": "sha256:" + "2" * 64}


def _bound(**changes: Any) -> dict[str, Any]:
    sealing, receipt = SoftwareKey.generate().public_key, SoftwareKey.generate().public_key
    epochs = (binding.EpochEntry(key_id_for(sealing, "r1"), sealing, receipt, 1_800_000_000),)
    document = binding.Binding(
        nonce=b"\x01" * 32,
        sealing_key=sealing,
        receipt_key=receipt,
        models=(),
        payment=None,
        gateway_version="1",
        code_digest="sha256:" + "0" * 64,
        issued_at=1,
        epochs=epochs,
        gpu=binding.GpuBinding("sha256:" + "1" * 64, "sha256:" + "2" * 64),
    ).document()
    document.update(changes)
    return document


def test_binding_round_trips_epochs_and_gpu() -> None:
    document = _bound()
    parsed = binding.parse(document)
    assert parsed.document() == document
    assert parsed.epochs[0].sealing_key == parsed.sealing_key
    assert parsed.gpu is not None
    assert parsed.epoch(parsed.epochs[0].id) is parsed.epochs[0]


def test_the_configuration_digest_leaves_rotating_keys_out() -> None:
    parsed = binding.parse(_bound())
    other = binding.parse(_bound())  # other keys, same configuration
    assert parsed.config_digest() == other.config_digest()
    unrotated = binding.parse({k: v for k, v in _bound().items() if k != "epochs"})
    assert unrotated.config_digest() != parsed.config_digest()


@pytest.mark.parametrize(
    "change",
    [
        {"epochs": []},
        {"epochs": "x"},
        {"epochs": [{"id": "a"}]},
        {"gpu": {**_GPU, "kind": "amd"}},
        {"gpu": {"kind": "nvidia"}},
    ],
)
def test_malformed_epochs_and_gpu_are_refused(change: dict[str, Any]) -> None:
    with pytest.raises(binding.BindingInvalid):
        binding.parse(_bound(**change))


def test_the_first_epoch_must_be_the_documents_keys() -> None:
    document = _bound()
    document["sealing_key"] = SoftwareKey.generate().public_key.hex()
    with pytest.raises(binding.BindingInvalid, match="current epoch"):
        binding.parse(document)
    twice = _bound()
    twice["epochs"] = twice["epochs"] * 2
    with pytest.raises(binding.BindingInvalid, match="twice"):
        binding.parse(twice)


# --- the key document's key id -----------------------------------------------------------


def test_a_key_document_key_id_must_name_its_key() -> None:
    point = SoftwareKey.generate().public_key
    good = key_id_for(point, "r1")
    assert key_id_matches(good, point)
    body = f'{{"pubkey": "{point.hex()}", "key_id": "{good}"}}'.encode()
    assert parse_pubkey_document("http://x", 200, body).key_id == good
    other = key_id_for(SoftwareKey.generate().public_key, "r1")
    for bad in (other, good.partition("@")[0], good + "\n", 7):
        value = f'"{bad}"' if isinstance(bad, str) else str(bad)
        body = f'{{"pubkey": "{point.hex()}", "key_id": {value}}}'.encode()
        with pytest.raises(PubkeyUnavailable):
            parse_pubkey_document("http://x", 200, body)


# --- settings ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800),
                                               ("24h", 86400), ("7d", 604800)])  # fmt: skip
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "-1h", "nan", "inf", "1w", "1e400s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_key_epoch_settings() -> None:
    settings = Settings(key_epoch="24h", key_epoch_grace="10m")
    assert (settings.key_epoch, settings.key_epoch_grace) == (86400, 600)
    assert Settings().key_epoch == 0  # off: one long-lived key
    for bad in ({"key_epoch": "1m", "key_epoch_grace": "1m"}, {"key_epoch": "5s"}):
        with pytest.raises(ValueError, match="key_epoch"):
            Settings(**bad)


# --- the NVIDIA policy ---------------------------------------------------------------------


def _verify(gpu: StandInGpu, policy: NvidiaGpuPolicy, **extra: Any) -> Any:
    nonce = hashlib.sha256(b"n").digest()
    evidence = gpu.attest(nonce)
    verifier = NvidiaGpuVerifier(policy, evidence.certificates, [gpu.root], **extra)
    return verifier.verify(
        evidence.evidence, at=datetime.now(UTC), binding=ExpectedBinding(nonce=nonce)
    )


def test_driver_and_vbios_minimums() -> None:
    gpu = StandInGpu.make()
    assert _verify(
        gpu, NvidiaGpuPolicy(driver_min=(550, 90, 7), vbios_min=(0x96, 0, 0x9F, 0, 1))
    ).ok
    low = _verify(gpu, NvidiaGpuPolicy(driver_min=(555,)))
    assert low.codes == ("tcb_too_low",)
    vbios = _verify(gpu, NvidiaGpuPolicy(vbios_min=(0x97, 0, 0, 0, 0)))
    assert vbios.codes == ("tcb_too_low",)
    assert version_tuple("96.00.9f.00.01") == (0x96, 0, 0x9F, 0, 1)
    policy = NvidiaGpuPolicy.from_mapping({"driver_min": "550.90", "vbios_min": "96.00.00.00.00"})
    assert policy.driver_min == (550, 90)
    with pytest.raises(ValueError, match="unknown"):
        NvidiaGpuPolicy.from_mapping({"driver_minimum": "1"})


def test_ocsp_is_asked_when_given_and_a_visible_skip_otherwise() -> None:
    gpu = StandInGpu.make()
    checks = {c.name: c for c in _verify(gpu, NvidiaGpuPolicy()).checks}
    assert checks["revocation"].status == "skip"
    assert "offline" in checks["revocation"].detail
    asked: list[x509.Certificate] = []

    def good(cert: x509.Certificate, issuer: x509.Certificate) -> str:
        asked.append(cert)
        return "good"

    verdict = _verify(gpu, NvidiaGpuPolicy(), ocsp=good)
    assert verdict.ok
    assert {c.name: c for c in verdict.checks}["revocation"].status == "pass"
    assert asked == [gpu.leaf]
    revoked = _verify(gpu, NvidiaGpuPolicy(), ocsp=lambda cert, issuer: "revoked")
    assert revoked.codes == ("cert_revoked",)

    def unreachable(cert: x509.Certificate, issuer: x509.Certificate) -> str:
        raise OSError("no network")

    offline = {c.name: c for c in _verify(gpu, NvidiaGpuPolicy(), ocsp=unreachable).checks}
    assert offline["revocation"].status == "skip"
    assert "unreachable" in offline["revocation"].detail


def test_key_epochs_are_refused_with_several_workers() -> None:
    from paygate.config import ConfigError
    from paygate.server.workers import check_workers

    with pytest.raises(ConfigError, match="key_epoch"):
        check_workers(2, upstream_mode="attach", key_backend="software", tpm_tcti="", key_epoch=60)
    check_workers(1, upstream_mode="attach", key_backend="software", tpm_tcti="", key_epoch=60)


def test_a_policy_file_can_require_a_gpu(tmp_path: Any) -> None:
    import json as json_module

    from paygate.client.attestation import AttestationPolicy, GpuPolicy, load_gpu_policy

    gpu = StandInGpu.make()
    from cryptography.hazmat.primitives import serialization

    (tmp_path / "gpu-root.pem").write_bytes(gpu.root.public_bytes(serialization.Encoding.PEM))
    entry = {"mode": "required", "driver_min": "550.90", "measurements": {"2": "ab" * 48},
             "roots": "gpu-root.pem"}  # fmt: skip
    path = tmp_path / "policy.json"
    path.write_text(json_module.dumps({"gpu": entry}))
    loaded = load_gpu_policy(path)
    assert loaded is not None
    assert loaded.required
    assert loaded.policy.driver_min == (550, 90)
    assert loaded.roots == (gpu.root,)
    policy = AttestationPolicy.from_files(
        None, tee_policy=path, code_digests={"sha256:" + "0" * 64}
    )
    assert policy.gpu == loaded
    assert policy.tee == {}
    assert GpuPolicy.from_mapping("optional").required is False
    for bad in ("sometimes", {"mode": "required", "driver_minimum": "1"}):
        path.write_text(json_module.dumps({"gpu": bad}))
        with pytest.raises(ValueError, match="gpu"):
            load_gpu_policy(path)
