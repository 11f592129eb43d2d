"""GPU evidence on the live attestation route: a TPM gateway (swtpm with certified EKs) whose GPU
is the stand-in H100 (NVIDIA's recorded exchange, re-signed by a test-made chain for each fresh
nonce). The client checks the GPU answered its own nonce, that the binding document the TPM
quoted names exactly that evidence, and the policy's allow-list and minimums — and refuses,
before sealing anything, a GPU evidence that does not match, a GPU nonce from another request,
and missing GPU evidence when the policy requires it."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from paygate_dev.stack import Swtpm

from enclave.attestation.nvidia import NvidiaGpuPolicy
from enclave.keys.tpm import TpmKey
from paygate import release
from paygate.client import AttestationPolicy, ClientError, GpuPolicy, PaygateTransport
from tests.fixtures.attestation_standins import StandInGpu
from tests.fixtures.attestation_support import Middlebox, edit_evidence
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import CHAT, CHAT_BODY
from tests.fixtures.swtpm import EkCa

# Measurement block 2 of the recorded H100 (what NVIDIA's RIM for that VBIOS lists).
M2 = bytes.fromhex(
    "8048dfd18fe229bf16eb9d30cca0f11a24dafe6eb731de14"
    "62984645a0b189b77c4e4e17de727a5e19e3d07de51da338"
)


@pytest.fixture(scope="module")
def tpm_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[TpmKey]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path_factory.mktemp("tpm") / "key") as key:
        yield key


@pytest.fixture(scope="module")
def gpu() -> StandInGpu:
    return StandInGpu.make()


def _gateway(tpm_key: TpmKey, gpu: StandInGpu | None) -> ThreadedStack:
    return ThreadedStack(
        key=tpm_key,
        gpu=gpu,
        key_backend="tpm",
        attestation="tpm",
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
    )


def _policy(ek_ca: EkCa, gpu: StandInGpu, **changes: Any) -> AttestationPolicy:
    base = AttestationPolicy.from_files(ek_ca.chain_pem, code_digests={release.code_digest()})
    options: dict[str, Any] = {"required": True, **changes}
    gpu_policy = GpuPolicy(
        policy=NvidiaGpuPolicy(
            measurements={2: frozenset({M2})},
            driver_min=(550, 0),
            vbios_min=(0x96, 0x00, 0x00, 0x00, 0x00),
        ),
        roots=(gpu.root,),
        **options,
    )
    return dataclasses.replace(base, gpu=gpu_policy)


def _refused(stack: Stack, transport: PaygateTransport) -> ClientError:
    with (
        httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.post(CHAT, json=CHAT_BODY)
    assert sum(stack.fake.hits.values()) == 0  # nothing was sealed or sent
    return caught.value


def test_gpu_evidence_for_the_clients_nonce_is_checked_then_requests_are_sealed(
    tpm_key: TpmKey, gpu: StandInGpu, ek_ca: EkCa
) -> None:
    with _gateway(tpm_key, gpu) as stack:
        transport = PaygateTransport(envelope="v2", attestation=_policy(ek_ca, gpu))
        with httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client:
            reply = client.post(CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
        attested = transport.attested(stack.url)
        assert attested is not None
        assert attested.binding.gpu is not None
        checks = {c.name: c for c in attested.checks}
        for name in ("gpu_binding", "spdm_signature", "chain_root", "nonce", "measurement2"):
            assert checks[name].status == "pass", (name, checks[name])
        assert checks["driver_min"].detail.startswith("550.90.07 >=")
        assert checks["vbios_min"].detail.startswith("96.00.9f.00.01 >=")
        # Offline: OCSP is not asked, and the verdict says so (a skip, with its reason).
        assert checks["revocation"].status == "skip"
        assert "offline" in checks["revocation"].detail
        # The quote covers the binding, which names the GPU evidence by digest.
        assert checks["quote"].status == "pass"


def test_gpu_evidence_other_than_the_bound_one_is_refused(
    tpm_key: TpmKey, gpu: StandInGpu, ek_ca: EkCa
) -> None:
    def flip(document: dict[str, Any]) -> None:
        raw = bytearray(base64.urlsafe_b64decode(document["gpu"]["evidence"] + "=="))
        raw[100] ^= 1  # a measurement byte: the evidence is no longer the one bound
        document["gpu"]["evidence"] = base64.urlsafe_b64encode(bytes(raw)).decode()

    with _gateway(tpm_key, gpu) as stack:
        transport = PaygateTransport(
            transport=Middlebox(edit_evidence(flip)),
            envelope="v2",
            attestation=_policy(ek_ca, gpu),
        )
        assert _refused(stack, transport).code == "gpu_evidence_mismatch"


def test_gpu_evidence_stripped_on_the_path_is_refused(
    tpm_key: TpmKey, gpu: StandInGpu, ek_ca: EkCa
) -> None:
    def strip(document: dict[str, Any]) -> None:
        del document["gpu"]

    with _gateway(tpm_key, gpu) as stack:
        transport = PaygateTransport(
            transport=Middlebox(edit_evidence(strip)),
            envelope="v2",
            attestation=_policy(ek_ca, gpu),
        )
        assert _refused(stack, transport).code == "gpu_evidence_mismatch"


def test_a_gpu_nonce_from_another_request_is_refused(
    tpm_key: TpmKey, ek_ca: EkCa, tmp_path: Path
) -> None:
    replaying = StandInGpu.make()
    replaying.replay_nonce = bytes.fromhex("ab" * 32)  # an answer recorded for another nonce
    with _gateway(tpm_key, replaying) as stack:
        transport = PaygateTransport(envelope="v2", attestation=_policy(ek_ca, replaying))
        error = _refused(stack, transport)
        assert error.code == "nonce_mismatch"
        assert "gpu nonce" in str(error)


def test_missing_gpu_evidence_under_gpu_required_is_refused(
    tpm_key: TpmKey, gpu: StandInGpu, ek_ca: EkCa
) -> None:
    with _gateway(tpm_key, None) as stack:
        transport = PaygateTransport(envelope="v2", attestation=_policy(ek_ca, gpu))
        assert _refused(stack, transport).code == "gpu_evidence_missing"
        # Optional: the same appliance passes, and the verdict records the skip.
        optional = PaygateTransport(envelope="v2", attestation=_policy(ek_ca, gpu, required=False))
        with httpx.Client(transport=optional, base_url=stack.url, timeout=30) as client:
            assert client.post(CHAT, json=CHAT_BODY).status_code == 200
        attested = optional.attested(stack.url)
        assert attested is not None
        gpu_check = next(c for c in attested.checks if c.name == "gpu")
        assert gpu_check.status == "skip"


def test_a_gpu_chain_outside_the_trusted_root_is_refused(
    tpm_key: TpmKey, gpu: StandInGpu, ek_ca: EkCa
) -> None:
    """The default root is the shipped NVIDIA Device Identity CA: a test-made chain fails."""
    with _gateway(tpm_key, gpu) as stack:
        shipped = dataclasses.replace(_policy(ek_ca, gpu), gpu=GpuPolicy(required=True))
        transport = PaygateTransport(envelope="v2", attestation=shipped)
        assert _refused(stack, transport).code == "untrusted_root"
