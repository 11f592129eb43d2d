"""The code digest of a paygate release: one value a caller can pin.

The gateway measures its own installed files into PCR 23 at start (with the configuration
digest) and names the same digest in every binding document; a client's
``AttestationPolicy.code_digests`` accepts only the digests it pins. ``paygate release digest``
prints the digest of the installed paygate, or of a wheel (``--wheel``) before installing it:
the two agree, because both hash the same files (the wheel is built reproducibly, see
docs/ATTESTATION.md "Pinning the code").

The digest: SHA-256 over every file of the ``paygate`` and ``enclave`` packages (sources and
package data; never ``__pycache__``), in the order of their paths relative to the site
directory (``paygate/cli/main.py``), each as ``path NUL length NUL bytes``. It covers this
project's code, not the Python interpreter or the dependencies it imports.
"""

from __future__ import annotations

import hashlib
import importlib.util
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from paygate.errors import PaygateError

PACKAGES = ("paygate", "enclave")
_MAX_WHEEL_MEMBER = 64 * 1024 * 1024  # a source file or root certificate is far smaller


class ReleaseError(PaygateError):
    """the code digest cannot be computed (a package or wheel is missing or unreadable)"""

    message = "the code digest cannot be computed (a package or wheel is missing or unreadable)"

    code = "release_unreadable"


def digest_of(files: Iterable[tuple[str, bytes]]) -> str:
    """``sha256:<hex>`` of (relative path, bytes) pairs, in path order."""
    hasher = hashlib.sha256()
    for relative, data in sorted(files, key=lambda item: item[0]):
        hasher.update(f"{relative}\0{len(data)}\0".encode())
        hasher.update(data)
    return "sha256:" + hasher.hexdigest()


def _counted(relative: str) -> bool:
    parts = relative.split("/")
    return (
        parts[0] in PACKAGES
        and "__pycache__" not in parts
        and not relative.endswith((".pyc", ".pyo"))
    )


def installed_files(packages: Iterable[str] = PACKAGES) -> Iterator[tuple[str, bytes]]:
    """The files of the importable ``packages`` as (path relative to the site dir, bytes)."""
    for package in packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ReleaseError(f"the package {package} is not importable here")
        root = Path(next(iter(spec.submodule_search_locations)))
        for path in root.rglob("*"):
            relative = f"{package}/{path.relative_to(root).as_posix()}"
            if path.is_file() and _counted(relative):
                yield relative, path.read_bytes()


def code_digest(packages: Iterable[str] = PACKAGES) -> str:
    """The code digest of the paygate this interpreter imports (what the gateway attests)."""
    return digest_of(installed_files(packages))


def wheel_code_digest(wheel: str | Path) -> str:
    """The code digest paygate would have once this wheel is installed."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [
                info for info in archive.infolist() if not info.is_dir() and _counted(info.filename)
            ]
            if any(info.file_size > _MAX_WHEEL_MEMBER for info in members):
                raise ReleaseError("a wheel member is implausibly large")
            files = [(info.filename, archive.read(info)) for info in members]
    except (OSError, zipfile.BadZipFile) as exc:
        raise ReleaseError(f"cannot read the wheel {wheel}: {exc}") from None
    if not files:
        raise ReleaseError(f"{wheel} holds no paygate or enclave files")
    return digest_of(files)
