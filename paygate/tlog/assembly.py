"""Part of the app factory: settings → the transparency log (or None when it is off).

Reads :class:`~paygate.config.Settings` like :mod:`paygate.server.assembly`; everything it
builds takes explicit arguments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from enclave import KeyBackend
from enclave.attestation import binding
from enclave.attestation.binding import LogIdentity
from enclave.keys.base import LogSigner
from enclave.keys.epochs import Epoch
from enclave.keys.shared_epochs import SharedEpochKeys
from enclave.tlog import entries
from paygate.config import ConfigError, Settings
from paygate.server.attestation import AttestationService
from paygate.server.epochs import told
from paygate.tlog.errors import LogStoreError
from paygate.tlog.open_store import open_log_store
from paygate.tlog.recovery import RecoveryConfig
from paygate.tlog.service import (
    LogConfig,
    TransparencyLog,
    evidence_digest,
    log_identity,
    parse_witness,
)
from paygate.x402.ledger import LedgerError, default_replica_id


def log_origin(settings: Settings) -> str:
    """``log_origin``, else the public URL without its scheme, + ``/v1/log`` (tlog-tiles: the
    origin SHOULD be the log's URL prefix without the scheme)."""
    if settings.log_origin:
        return settings.log_origin
    if settings.public_url:
        parts = urlsplit(settings.public_url)
        return f"{parts.netloc}{parts.path.rstrip('/')}/v1/log"
    raise ConfigError("the transparency log needs log_origin (PAYGATE_LOG_ORIGIN) or public_url")


def identity(settings: Settings, key: KeyBackend) -> LogIdentity | None:
    """What the binding document names: the log's origin and key (None: no log)."""
    if not settings.transparency_log:
        return None
    if not isinstance(key, LogSigner):
        raise ConfigError(f"the {settings.key_backend} key backend has no log key")
    return log_identity(log_origin(settings), key)


def log_config(settings: Settings) -> LogConfig:
    try:
        witnesses = tuple(parse_witness(item) for item in settings.log_witnesses)
    except ValueError as exc:
        raise ConfigError(f"log_witnesses: {exc}") from None
    return LogConfig(
        origin=log_origin(settings),
        replica=settings.replica_id or default_replica_id(),
        receipt_period=settings.log_receipt_period,
        witnesses=witnesses,
        witness_timeout=settings.log_witness_timeout,
        recovery=RecoveryConfig(
            batch=settings.log_recovery_batch,
            grace=settings.log_recovery_grace,
            window=settings.log_recovery_window,
            interval=settings.reconcile_interval_seconds,
        ),
    )


def on_rotation(
    tlog: TransparencyLog, attestation: AttestationService
) -> Callable[[Epoch], Awaitable[None]]:
    """After each key rotation: a key-epoch entry for the new keys, with fresh evidence (its
    nonce derived from the keys, as at start), so every epoch's keys are in the log."""

    async def append(epoch: Epoch) -> None:
        nonce = entries.epoch_nonce(epoch.sealing_key, epoch.receipt_key, tlog.identity.key)
        loop = asyncio.get_running_loop()
        document = await loop.run_in_executor(None, attestation.evidence, nonce)
        bound = binding.parse(document["binding"])
        if (bound.sealing_key, bound.receipt_key) != (epoch.sealing_key, epoch.receipt_key):
            # A later rotation is served already: this evidence would announce other keys.
            raise LogStoreError(f"key epoch {epoch.id} is no longer current: not logged")
        entry = entries.key_epoch(
            time=int(time.time()),
            replica=tlog.config.replica,
            sealing_key=bound.sealing_key,
            receipt_key=bound.receipt_key,
            log_key=tlog.identity.key,
            evidence_kind=attestation.kind,
            evidence_digest=evidence_digest(document),
        )
        await tlog.append([entry])

    return append


async def start_log(
    settings: Settings, key: KeyBackend, attestation: AttestationService
) -> TransparencyLog:
    """Open the store, claim it for this origin, append the release and key-epoch entries (the
    key epoch's evidence is made now, for :func:`enclave.tlog.entries.epoch_nonce`)."""
    assert isinstance(key, LogSigner)
    config = log_config(settings)
    try:
        store = await open_log_store(settings.ledger_location())
    except (LedgerError, LogStoreError) as exc:
        raise ConfigError(f"the transparency log's store: {exc}") from None
    tlog = TransparencyLog(config, store, key)
    # With several workers: the host's epochs, and the one this start's evidence is made for.
    host = (key, key.current) if isinstance(key, SharedEpochKeys) else None
    try:
        loop = asyncio.get_running_loop()
        nonce = entries.epoch_nonce(
            key.public_key, attestation.receipt_public_key, tlog.identity.key
        )
        document = await loop.run_in_executor(None, attestation.evidence, nonce)
        bound = binding.parse(document["binding"])
        now = int(time.time())
        release = entries.release(
            time=now,
            replica=config.replica,
            paygate_version=bound.gateway_version,
            code_digest=bound.code_digest,
            config_digest="sha256:" + attestation.config_digest().hex(),
            weights=[(m.name, m.digest) for m in bound.models],
            engine_kind=settings.upstream_kind,
            wheel_sha256=settings.log_wheel_sha256,
            image_digest=settings.log_image_digest,
        )
        epoch = entries.key_epoch(
            time=now,
            replica=config.replica,
            sealing_key=bound.sealing_key,
            receipt_key=bound.receipt_key,
            log_key=tlog.identity.key,
            evidence_kind=attestation.kind,
            evidence_digest=evidence_digest(document),
        )
        # With several workers the epoch is the host's: logged by the worker that made it.
        made = host is None or host[0].made_here(host[1].id)
        await tlog.start([release, epoch] if made else [release])
        if host is not None and made and bound.sealing_key == host[1].sealing_key:
            # Told: another worker tells it again only if this one dies before this mark.
            await loop.run_in_executor(None, told, *host)
    except LogStoreError as exc:
        await tlog.close()
        raise ConfigError(f"the transparency log: {exc}") from None
    except BaseException:
        await tlog.close()
        raise
    return tlog
