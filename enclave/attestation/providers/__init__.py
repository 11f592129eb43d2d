"""Evidence providers: what an appliance inside a TEE calls to get evidence carrying its binding.

One module per interface: ``configfs_tsm`` (Linux's TSM report interface, SEV-SNP and TDX
guests), ``sev_guest`` (the older ``/dev/sev-guest`` ioctl, SEV-SNP only) and ``nsm`` (the
Nitro Secure Module inside an enclave). Each takes the binding as an
:class:`~enclave.attestation.base.ExpectedBinding` (report_data for SEV-SNP/TDX; nonce,
user_data and public_key for Nitro) and returns :class:`TeeEvidence` that the matching verifier
checks. Paths and transports are injectable so tests can stand in for the hardware.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from enclave.attestation.base import EvidenceError, ExpectedBinding
from enclave.attestation.sev_snp import parse_cert_table
from enclave.errors import EnclaveError

MAX_BLOB = 256 * 1024  # reports, quotes, documents and certificate tables are a few KiB


class EvidenceUnavailable(EnclaveError):
    message = "the TEE did not produce evidence"

    code = "evidence_unavailable"


@dataclass(frozen=True, slots=True)
class TeeEvidence:
    kind: str  # "sev-snp" | "tdx" | "nitro": the verifier that reads it
    evidence: bytes  # the report, quote or attestation document as the TEE returned it
    certificates: tuple[bytes, ...] = ()  # SEV-SNP: VCEK/VLEK (and ASK/ARK) the host provided
    source: str = ""  # which interface produced it, e.g. "configfs-tsm:sev_guest"


@runtime_checkable
class EvidenceProvider(Protocol):
    def attest(self, binding: ExpectedBinding) -> TeeEvidence: ...


def certificates_of(table: bytes) -> tuple[bytes, ...]:
    """The certificates of an SEV-SNP extended report's table (empty table: none)."""
    try:
        return tuple(parse_cert_table(table).values()) if table else ()
    except EvidenceError as exc:
        raise EvidenceUnavailable(f"bad certificate table from the platform: {exc}") from None


def report_data_of(binding: ExpectedBinding) -> bytes:
    """The 64 report_data bytes for SEV-SNP/TDX (a shorter digest is zero-padded)."""
    data = binding.report_data
    if data is None or len(data) > 64:
        raise EvidenceUnavailable("report_data must be given and at most 64 bytes")
    return data.ljust(64, b"\0")


def open_provider(
    kind: str,
    *,
    configfs_root: str = "/sys/kernel/config/tsm",
    sev_guest_device: str = "/dev/sev-guest",
    nsm_device: str = "/dev/nsm",
) -> EvidenceProvider:
    """The provider for a TEE kind on this machine: configfs-tsm for SEV-SNP and TDX (with
    ``/dev/sev-guest`` as SEV-SNP's fallback on older kernels), the NSM for Nitro."""
    # Imported here: the provider modules import this one.
    from enclave.attestation.providers.configfs_tsm import ConfigfsTsmProvider
    from enclave.attestation.providers.nsm import NsmDevice, NsmProvider
    from enclave.attestation.providers.sev_guest import SevGuestDevice, SevGuestProvider

    if kind in ("sev-snp", "tdx"):
        if (Path(configfs_root) / "report").is_dir():
            return ConfigfsTsmProvider(Path(configfs_root))
        if kind == "sev-snp" and Path(sev_guest_device).exists():
            return SevGuestProvider(SevGuestDevice(Path(sev_guest_device)))
        raise EvidenceUnavailable(f"no {kind} report interface (configfs-tsm) on this machine")
    if kind == "nitro":
        if Path(nsm_device).exists():
            return NsmProvider(NsmDevice(Path(nsm_device)))
        raise EvidenceUnavailable(f"no Nitro Secure Module at {nsm_device}")
    raise EvidenceUnavailable(f"unknown TEE kind {kind!r}")
