"""GPU evidence on the live route: where the appliance gets it, and how it is bound.

A confidential-computing GPU (NVIDIA Hopper in CC mode) answers an SPDM GET_MEASUREMENTS with
the requester's nonce, signed by its device identity key. The appliance asks its GPU with the
*same* nonce the verifier sent for the CPU evidence, and the binding document (which the CPU's
quote or report covers) names the SHA-256 of that exchange and of the GPU's certificate chain:
one nonce, one document, so the GPU evidence cannot be swapped for another GPU's, replayed from
another request, or dropped without the verifier seeing it.

Providers (:class:`GpuEvidenceProvider`): :class:`NvmlProvider` asks the driver through NVML
(``nvmlDeviceGetConfComputeGpuAttestationReport`` and ``...GpuCertificate`` of
libnvidia-ml.so.1, loaded with ctypes, nothing to install); tests use a stand-in that replays
NVIDIA's recorded H100 exchange re-signed by a test-made chain (tests/fixtures).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Protocol

from enclave.attestation.binding import GpuBinding, sha256_digest
from enclave.errors import EnclaveError

NONCE_LEN = 32


class GpuUnavailable(EnclaveError):
    message = "the GPU could not produce evidence"

    code = "gpu_evidence_unavailable"


@dataclass(frozen=True, slots=True)
class GpuEvidence:
    """One GPU's answer to one nonce: the SPDM exchange and its certificate chain (PEM)."""

    evidence: bytes  # SPDM GET_MEASUREMENTS request || signed MEASUREMENTS response
    certificates: bytes  # the device's chain, leaf first, PEM (what the driver hands out)
    source: str
    kind: str = "nvidia"

    def binding(self) -> GpuBinding:
        return GpuBinding(sha256_digest(self.evidence), sha256_digest(self.certificates), self.kind)


class GpuEvidenceProvider(Protocol):
    """The appliance's way to its GPU's evidence (blocking: run it in an executor)."""

    def attest(self, nonce: bytes) -> GpuEvidence:
        """Evidence with ``nonce`` (32 bytes) in its SPDM request; GpuUnavailable otherwise."""
        ...


# --- NVML --------------------------------------------------------------------------------------

_REPORT_SIZE = 0x2000  # NVML_CC_GPU_ATTESTATION_REPORT_SIZE
_CEC_REPORT_SIZE = 0x1000  # NVML_CC_GPU_CEC_ATTESTATION_REPORT_SIZE
_CERT_CHAIN_SIZE = 0x1000  # NVML_GPU_CERT_CHAIN_SIZE
_ATTESTATION_CHAIN_SIZE = 0x1400  # NVML_GPU_ATTESTATION_CERT_CHAIN_SIZE


class _Report(ctypes.Structure):
    _fields_ = (  # nvmlConfComputeGpuAttestationReport_t
        ("isCecAttestationReportPresent", ctypes.c_uint),
        ("attestationReportSize", ctypes.c_uint),
        ("cecAttestationReportSize", ctypes.c_uint),
        ("nonce", ctypes.c_ubyte * NONCE_LEN),
        ("attestationReport", ctypes.c_ubyte * _REPORT_SIZE),
        ("cecAttestationReport", ctypes.c_ubyte * _CEC_REPORT_SIZE),
    )


class _Certificate(ctypes.Structure):
    _fields_ = (  # nvmlConfComputeGpuCertificate_t
        ("certChainSize", ctypes.c_uint),
        ("attestationCertChainSize", ctypes.c_uint),
        ("certChain", ctypes.c_ubyte * _CERT_CHAIN_SIZE),
        ("attestationCertChain", ctypes.c_ubyte * _ATTESTATION_CHAIN_SIZE),
    )


class NvmlProvider:
    """The GPU at ``index`` through NVML (the driver must have CC mode on). Not exercised by the
    test suite (no GPU on the build machine): the stand-in covers everything after the driver."""

    def __init__(self, index: int = 0, library: str = "libnvidia-ml.so.1") -> None:
        try:
            self._nvml = ctypes.CDLL(library)
        except OSError:
            raise GpuUnavailable(f"NVML ({library}) is not installed") from None
        self._index = index
        self._lock = threading.Lock()
        self._call("nvmlInit_v2")

    def _call(self, name: str, *args: object) -> None:
        try:
            function = getattr(self._nvml, name)
        except AttributeError:
            raise GpuUnavailable(f"this NVML has no {name} (driver too old for CC)") from None
        status = function(*args)
        if status != 0:
            raise GpuUnavailable(f"{name} failed with NVML status {status}")

    def attest(self, nonce: bytes) -> GpuEvidence:
        if len(nonce) != NONCE_LEN:
            raise ValueError("the GPU nonce is 32 bytes")
        with self._lock:
            device = ctypes.c_void_p()
            self._call("nvmlDeviceGetHandleByIndex_v2", self._index, ctypes.byref(device))
            report = _Report()
            ctypes.memmove(report.nonce, nonce, NONCE_LEN)
            self._call("nvmlDeviceGetConfComputeGpuAttestationReport", device, ctypes.byref(report))
            cert = _Certificate()
            self._call("nvmlDeviceGetConfComputeGpuCertificate", device, ctypes.byref(cert))
        size = min(report.attestationReportSize, _REPORT_SIZE)
        chain = min(cert.attestationCertChainSize, _ATTESTATION_CHAIN_SIZE)
        return GpuEvidence(
            evidence=bytes(report.attestationReport)[:size],
            certificates=bytes(cert.attestationCertChain)[:chain],
            source=f"nvml:gpu{self._index}",
        )
