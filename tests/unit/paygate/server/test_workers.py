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
