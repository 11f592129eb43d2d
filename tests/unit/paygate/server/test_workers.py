"""What cannot run as several workers is refused before anything listens."""

from __future__ import annotations

import pytest

from paygate.config import ConfigError
from paygate.server.workers import check_workers


@pytest.mark.parametrize(
    ("upstream_mode", "key_backend", "tpm_tcti", "why"),
    [
        ("container", "software", "", "upstream_mode attach"),
        ("attach", "tee-memory", "", "tee-memory"),
        ("attach", "tpm", "swtpm:host=127.0.0.1,port=2321", "resource manager"),
    ],
)
def test_singletons_that_cannot_be_per_worker_are_refused(
    upstream_mode: str, key_backend: str, tpm_tcti: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        check_workers(2, upstream_mode=upstream_mode, key_backend=key_backend, tpm_tcti=tpm_tcti)
    # One worker is always fine.
    check_workers(1, upstream_mode=upstream_mode, key_backend=key_backend, tpm_tcti=tpm_tcti)


def test_what_every_worker_can_open_for_itself_is_allowed() -> None:
    for key_backend, tcti in (("software", ""), ("pkcs11", ""), ("tpm", "device:/dev/tpmrm0")):
        check_workers(4, upstream_mode="attach", key_backend=key_backend, tpm_tcti=tcti)


def test_key_epochs_with_workers_need_keys_every_worker_can_open() -> None:
    """Epoch keys in a token or a TPM are shared by the workers (one set per host); keys that
    live in one process's memory cannot be, and are refused before anything listens."""
    for key_backend in ("software", "tee-memory"):
        with pytest.raises(ConfigError, match="workers > 1 with key_epoch needs key_backend"):
            check_workers(
                2, upstream_mode="attach", key_backend=key_backend, tpm_tcti="", key_epoch=60
            )
    for key_backend, tcti in (("pkcs11", ""), ("tpm", "device:/dev/tpmrm0")):
        check_workers(
            4, upstream_mode="attach", key_backend=key_backend, tpm_tcti=tcti, key_epoch=60
        )
    # A TPM without a resource manager stays refused, epochs or not.
    with pytest.raises(ConfigError, match="resource manager"):
        check_workers(
            2, upstream_mode="attach", key_backend="tpm", tpm_tcti="swtpm:port=1", key_epoch=60
        )
