"""``/dev/sev-guest``: the SEV-SNP guest driver's ioctl, for kernels without configfs-tsm.

SNP_GET_EXT_REPORT (linux/sev-guest.h) sends ``struct snp_ext_report_req`` (user_data[64],
vmpl, reserved, then the address and length of a page-aligned buffer for the certificate
table) and receives ``struct snp_report_resp`` (4000 bytes): the firmware's MSG_REPORT_RSP,
i.e. status (u32), report_size (u32), 24 reserved bytes, then the 1184-byte report.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from pathlib import Path
from typing import Protocol

from enclave.attestation.base import ExpectedBinding
from enclave.attestation.providers import (
    EvidenceUnavailable,
    TeeEvidence,
    certificates_of,
    report_data_of,
)
from enclave.attestation.sev_snp import REPORT_SIZE

DEFAULT_DEVICE = Path("/dev/sev-guest")
RESPONSE_SIZE = 4000
CERTS_SIZE = 4 * mmap.PAGESIZE  # VCEK + ASK + ARK fit in a few pages
# _IOWR('S', 2, struct snp_guest_request_ioctl): the struct is 32 bytes on 64-bit Linux.
SNP_GET_EXT_REPORT = (3 << 30) | (32 << 16) | (ord("S") << 8) | 0x2


class SevGuestTransport(Protocol):
    def get_ext_report(self, request: bytes) -> tuple[bytes, bytes]:
        """(snp_report_resp, certificate table) for a 96-byte snp_report_req."""
        ...


class SevGuestDevice:
    """The real ioctl on ``/dev/sev-guest``."""

    def __init__(self, path: Path = DEFAULT_DEVICE) -> None:
        self.path = path

    def get_ext_report(self, request: bytes) -> tuple[bytes, bytes]:
        req = ctypes.create_string_buffer(112)
        resp = ctypes.create_string_buffer(RESPONSE_SIZE)
        certs = mmap.mmap(-1, CERTS_SIZE)  # page aligned, as the driver requires
        certs_addr = ctypes.addressof(ctypes.c_char.from_buffer(certs))
        struct.pack_into("<96sQI", req, 0, request, certs_addr, CERTS_SIZE)
        ioctl = bytearray(
            struct.pack("<B7xQQQ", 1, ctypes.addressof(req), ctypes.addressof(resp), 0)
        )
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise EvidenceUnavailable(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, SNP_GET_EXT_REPORT, ioctl, True)
        except OSError as exc:
            (exitinfo2,) = struct.unpack_from("<Q", ioctl, 24)
            raise EvidenceUnavailable(
                f"SNP_GET_EXT_REPORT failed: {exc.strerror} (exitinfo2 0x{exitinfo2:x})"
            ) from None
        finally:
            os.close(fd)
        return resp.raw, bytes(certs)


class SevGuestProvider:
    """SEV-SNP evidence from the guest driver (transport injectable for tests)."""

    def __init__(self, transport: SevGuestTransport | None = None, *, vmpl: int = 0) -> None:
        self.transport = transport or SevGuestDevice()
        self.vmpl = vmpl

    def attest(self, binding: ExpectedBinding) -> TeeEvidence:
        request = struct.pack("<64sI28x", report_data_of(binding), self.vmpl)
        response, table = self.transport.get_ext_report(request)
        if len(response) < 0x20 + REPORT_SIZE:
            raise EvidenceUnavailable("short response from the SEV guest driver")
        status, size = struct.unpack_from("<II", response, 0)
        if status != 0 or size != REPORT_SIZE:
            raise EvidenceUnavailable(f"firmware status 0x{status:x}, report size {size}")
        certificates = certificates_of(table)
        report = response[0x20 : 0x20 + REPORT_SIZE]
        return TeeEvidence("sev-snp", report, certificates, source="sev-guest")
