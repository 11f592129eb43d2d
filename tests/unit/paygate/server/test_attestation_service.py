"""The attestation endpoints' own limits, without HTTP: the global cap answers 503 at once
(never a queue) and the per-address token bucket refills with time."""

from __future__ import annotations

import asyncio
import threading

import pytest

from enclave import SoftwareKey
from paygate.server.attestation import (
    AttestationBusy,
    AttestationConfig,
    AttestationService,
    RateLimiter,
)


async def test_the_global_cap_refuses_past_max_concurrent_without_queueing() -> None:
    config = AttestationConfig("none", (), None, "0", "sha256:" + "00" * 32, max_concurrent=2)
    service = AttestationService(config, SoftwareKey.generate())
    release = threading.Event()

    def hold() -> str:
        release.wait(10)
        return "done"

    running = [asyncio.ensure_future(service._blocking(hold)) for _ in range(2)]
    await asyncio.sleep(0.05)
    with pytest.raises(AttestationBusy) as caught:
        await service._blocking(hold)
    assert caught.value.headers["Retry-After"] == "1"
    release.set()
    assert await asyncio.gather(*running) == ["done", "done"]
    assert await service._blocking(lambda: "free again") == "free again"


def test_rate_limiter_bursts_then_refills_per_address() -> None:
    now = [0.0]
    limiter = RateLimiter(per_minute=60, clock=lambda: now[0])  # one a second, burst 15
    assert all(limiter.allow("a") for _ in range(15))
    assert not limiter.allow("a")
    assert limiter.allow("b")  # another address has its own bucket
    now[0] += 2.0
    assert limiter.allow("a")
    assert limiter.allow("a")
    assert not limiter.allow("a")


def test_a_none_evidence_document_is_signed_by_the_receipt_key() -> None:
    from enclave.attestation import binding
    from enclave.attestation.tpm import verify_signature
    from paygate.server.attestation import unb64

    key = SoftwareKey.generate()
    config = AttestationConfig("none", (), None, "0.1.0", "sha256:" + "00" * 32)
    document = AttestationService(config, key).evidence(b"\x05" * 32)
    bound = binding.parse(document["binding"])
    assert bound.nonce == b"\x05" * 32
    assert bound.sealing_key == key.public_key
    signature = unb64(document["none"]["signature"])
    assert verify_signature(key.receipt_public_key, bound.canonical(), signature)


@pytest.mark.parametrize("gas_key", ["0x1234", "0x" + "zz" * 32])
def test_attest_show_refuses_a_malformed_gas_key_as_configuration(gas_key: str) -> None:
    """``attest show`` in chain mode with channels: a bad gas key is the same clear
    configuration error the gateway's start gives, never a traceback quoting the key."""
    from paygate.config import ConfigError, load_settings
    from paygate.server.app import configured_channels

    settings = load_settings(
        payment_mode="chain",
        pay_to="0x" + "22" * 20,
        chain_rpc_url="http://127.0.0.1:8545",
        gas_key=gas_key,
        payment_schemes=["exact", "batch-settlement"],
    )
    with pytest.raises(ConfigError, match="gas_key is not a valid private key") as caught:
        configured_channels(settings)
    assert gas_key not in str(caught.value)
