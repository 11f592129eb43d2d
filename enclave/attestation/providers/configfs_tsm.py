"""Linux configfs-tsm (``/sys/kernel/config/tsm/report``): one interface for SEV-SNP and TDX guests.

Protocol (Documentation/ABI/testing/configfs-tsm): make an entry directory, write 64 bytes to
``inblob``, read ``outblob`` (the SEV-SNP report or TDX quote) and, where the platform provides
it, ``auxblob`` (SEV-SNP: the certificate table with the VCEK/VLEK). ``generation`` counts
writes to ``inblob``; a value other than 1 means another writer raced us on the same entry, so
the outblob may not carry our data. ``provider`` names the TEE (``sev_guest``, ``tdx_guest``).
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from pathlib import Path

from enclave.attestation.base import ExpectedBinding
from enclave.attestation.providers import (
    MAX_BLOB,
    EvidenceUnavailable,
    TeeEvidence,
    certificates_of,
    report_data_of,
)

DEFAULT_ROOT = Path("/sys/kernel/config/tsm")
KINDS = {"sev_guest": "sev-snp", "tdx_guest": "tdx"}


class ConfigfsTsmProvider:
    """Evidence from configfs-tsm under ``root`` (injectable for tests)."""

    def __init__(
        self, root: Path = DEFAULT_ROOT, *, privlevel: int | None = None, timeout: float = 10.0
    ) -> None:
        self.root = Path(root)
        self.privlevel = privlevel
        self.timeout = timeout

    def attest(self, binding: ExpectedBinding) -> TeeEvidence:
        inblob = report_data_of(binding)
        reports = self.root / "report"
        if not reports.is_dir():
            raise EvidenceUnavailable(f"no configfs-tsm report interface at {reports}")
        entry = reports / f"paygate-{secrets.token_hex(8)}"
        try:
            os.mkdir(entry, 0o700)
        except OSError as exc:
            raise EvidenceUnavailable(f"cannot create {entry}: {exc.strerror}") from None
        try:
            return self._report(entry, inblob)
        finally:
            try:
                os.rmdir(entry)  # configfs drops the attributes with the directory
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY):
                    raise

    def _report(self, entry: Path, inblob: bytes) -> TeeEvidence:
        deadline = time.monotonic() + self.timeout
        if self.privlevel is not None:
            _write(entry / "privlevel", str(self.privlevel).encode())
        _write(entry / "inblob", inblob)
        outblob = _read(_wait(entry / "outblob", deadline))
        provider = _read(entry / "provider").decode("ascii", "replace").strip()
        kind = KINDS.get(provider)
        if kind is None:
            raise EvidenceUnavailable(f"unknown configfs-tsm provider {provider!r}")
        aux = entry / "auxblob"
        certificates: tuple[bytes, ...] = ()
        if kind == "sev-snp" and aux.is_file():
            certificates = certificates_of(_read(aux))
        generation = _read(entry / "generation").strip()
        if generation != b"1":
            raise EvidenceUnavailable(
                f"configfs-tsm generation {generation!r}: another writer used the entry"
            )
        return TeeEvidence(kind, outblob, certificates, source=f"configfs-tsm:{provider}")


def _wait(path: Path, deadline: float) -> Path:
    # configfs creates an entry's attributes with the entry and produces outblob when it is
    # read, so this returns at once on a real kernel; the bound covers a slower stand-in.
    while not path.exists():
        if time.monotonic() > deadline:
            raise EvidenceUnavailable(f"timed out waiting for {path.name}")
        time.sleep(0.005)
    return path


def _write(path: Path, data: bytes) -> None:
    try:
        with open(path, "wb", buffering=0) as fh:
            fh.write(data)  # one write: configfs takes the blob in a single store
    except OSError as exc:
        raise EvidenceUnavailable(f"cannot write {path.name}: {exc.strerror}") from None


def _read(path: Path) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_BLOB + 1)
    except OSError as exc:
        raise EvidenceUnavailable(f"cannot read {path.name}: {exc.strerror}") from None
    if len(data) > MAX_BLOB:
        raise EvidenceUnavailable(f"{path.name} is larger than {MAX_BLOB} bytes")
    return data
