"""The Nitro Secure Module (``/dev/nsm``) inside an AWS Nitro enclave.

The NSM speaks CBOR: the request ``{"Attestation": {"user_data", "nonce", "public_key"}}``
answers ``{"Attestation": {"document": <COSE_Sign1>}}`` or ``{"Error": <name>}``. The kernel
driver passes it through the ``NSM_IOCTL_RAW`` ioctl (linux/nsm.h: two iovecs, request and
response; the driver sets the response length).
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from pathlib import Path
from typing import Any, Protocol

import cbor2

from enclave.attestation.base import ExpectedBinding
from enclave.attestation.providers import EvidenceUnavailable, TeeEvidence

DEFAULT_DEVICE = Path("/dev/nsm")
REQUEST_MAX = 0x1000
RESPONSE_MAX = 0x3000
NSM_IOCTL_RAW = (3 << 30) | (32 << 16) | (0x0A << 8) | 0x0  # _IOWR(0x0A, 0, struct nsm_raw)
# The NSM's limits on what an attestation request may carry.
LIMITS = {"user_data": 512, "nonce": 512, "public_key": 1024}


class NsmTransport(Protocol):
    def exchange(self, request: bytes) -> bytes:
        """One CBOR request to the NSM, its CBOR response."""
        ...


class NsmDevice:
    """The real ioctl on ``/dev/nsm``."""

    def __init__(self, path: Path = DEFAULT_DEVICE) -> None:
        self.path = path

    def exchange(self, request: bytes) -> bytes:
        if len(request) > REQUEST_MAX:
            raise EvidenceUnavailable("NSM request too large")
        req = ctypes.create_string_buffer(request, len(request))
        resp = ctypes.create_string_buffer(RESPONSE_MAX)
        msg = bytearray(
            struct.pack("<QQQQ", ctypes.addressof(req), len(request), ctypes.addressof(resp),
                        RESPONSE_MAX)
        )  # fmt: skip
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError as exc:
            raise EvidenceUnavailable(f"cannot open {self.path}: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, NSM_IOCTL_RAW, msg, True)
        except OSError as exc:
            raise EvidenceUnavailable(f"NSM request failed: {exc.strerror}") from None
        finally:
            os.close(fd)
        (length,) = struct.unpack_from("<Q", msg, 24)
        return resp.raw[: min(length, RESPONSE_MAX)]


class NsmProvider:
    """Nitro evidence from the NSM (transport injectable for tests)."""

    def __init__(self, transport: NsmTransport | None = None) -> None:
        self.transport = transport or NsmDevice()

    def attest(self, binding: ExpectedBinding) -> TeeEvidence:
        fields = {"user_data": binding.user_data, "nonce": binding.nonce,
                  "public_key": binding.public_key}  # fmt: skip
        for name, value in fields.items():
            if value is not None and len(value) > LIMITS[name]:
                raise EvidenceUnavailable(f"{name} is longer than the NSM takes ({LIMITS[name]})")
        response = self.transport.exchange(cbor2.dumps({"Attestation": fields}))
        try:
            answer: Any = cbor2.loads(response)
        except cbor2.CBORDecodeError:
            raise EvidenceUnavailable("the NSM answered something that is not CBOR") from None
        if isinstance(answer, dict) and "Error" in answer:
            raise EvidenceUnavailable(f"the NSM refused: {answer['Error']}")
        doc = answer.get("Attestation", {}).get("document") if isinstance(answer, dict) else None
        if not isinstance(doc, bytes):
            raise EvidenceUnavailable("the NSM answer holds no attestation document")
        return TeeEvidence("nitro", doc, source="nsm")
