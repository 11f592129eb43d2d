"""The client's batch-settlement channels kept across restarts: one JSON file per wallet.

A transport given ``channel_state=PATH`` keeps its channels (:mod:`paygate.client.channels`) in
``PATH``: what each channel is (its config, the offer it pays, the route its refund goes to) and
our own count of it (deposited, refunded, charged by receipts, the highest voucher signed,
whether the seller has confirmed it), plus what drained channels spent. So a restarted client
continues its channel with the next cumulative voucher — reconciled with the seller's word by
the corrective 402 as any stale count is — instead of locking up a second deposit.

The file is written before a signed voucher or deposit leaves the process (a crash after it
leaves us knowing the highest voucher the seller may hold), on a channel's first receipt, after
a refund or a resync, and at close (other receipts ride the next write: a file a receipt behind
costs a restart one corrective 402). Each write is atomic (a temporary file renamed over the old
one, both fsynced: ``paygate.files``), mode 0600, at most :data:`MAX_STATE_BYTES`. It holds no
key, no deposit authorization and no voucher we signed (a kept corrective offer may echo the
seller's copy of one: no secret). An HMAC under a key derived from the wallet's key
authenticates it, so a file that is tampered with, truncated or another wallet's is refused
(:class:`ChannelStateInvalid`), never half-read. One transport at a time holds it: an exclusive
lock on ``PATH.lock`` for the transport's life; a second one (in this process or another) is
refused (:class:`ChannelStateInUse`) rather than signing vouchers on a count it does not hold.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, BinaryIO

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from pydantic import ValidationError

from paygate import files, jsonsafe
from paygate.client.errors import ChannelStateInUse, ChannelStateInvalid
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig

FORMAT = "paygate-client-channels/1"
MAX_STATE_BYTES = 2 * 1024 * 1024
# An offer kept for a channel (its requirement and resource, echoed by refunds): bounded, so 64
# channels fit the file.
MAX_OFFER_BYTES = 16 * 1024
_MAC_DOMAIN = b"paygate client channel state v1"

ChannelKey = tuple[str, str, str, str]  # origin, network, asset, payTo


@dataclass
class OpenChannel:
    """One channel as this client knows it, and as the state file keeps it (atomic units)."""

    key: ChannelKey
    payer: PayerChannel
    requirement: dict[str, Any]
    resource: dict[str, Any] | None
    url: str
    decimals: int
    deposited: int = 0  # deposits signed (the channel's balance as far as we put it there)
    refunded: int = 0
    signed: int = 0  # the highest voucher signed
    held_until: float = 0.0
    pending: int | None = None  # the voucher of the request in flight
    confirmed: bool = False  # the seller answered on it: a deposit of ours landed

    @property
    def channel_id(self) -> str:
        return self.payer.channel_id

    @property
    def rest(self) -> int:
        """What the channel holds beyond what was charged: what vouchers may still take, and
        what a refund may bring back."""
        return self.deposited - self.refunded - self.payer.charged


@dataclass(slots=True)
class SavedBook:
    channels: list[OpenChannel] = field(default_factory=list)
    retired: Decimal = Decimal(0)  # whole tokens drained channels spent (charged, never back)


class ChannelStateFile:
    """``path``, locked for this holder until :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], account: LocalAccount) -> None:
        self.path = Path(path)
        self._account = account
        self._payer = str(account.address)
        self._mac_key = hmac.new(bytes(account.key), _MAC_DOMAIN, hashlib.sha256).digest()
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        # A file object: a transport dropped without close() lets go when it is collected.
        held = os.fdopen(fd, "r+b", buffering=0)
        try:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.close()
            raise ChannelStateInUse(
                f"the channel state {self.path.name} is held by another transport"
            ) from None
        self._held: BinaryIO | None = held

    def close(self) -> None:
        """Let go of the lock; nothing is written after this."""
        held, self._held = self._held, None
        if held is not None:
            held.close()  # and the lock with it

    # --- reading ---------------------------------------------------------------------------

    def load(self) -> SavedBook:
        """What the file holds (empty when there is none); ChannelStateInvalid when it is not
        ours, whole and well-formed."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return SavedBook()
        except OSError as exc:
            raise self._invalid(f"cannot be read ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as source:
            raw = source.read(MAX_STATE_BYTES + 1)
        if len(raw) > MAX_STATE_BYTES:
            raise self._invalid(f"is larger than {MAX_STATE_BYTES} bytes")
        try:
            document = jsonsafe.loads(raw, max_bytes=MAX_STATE_BYTES)
        except jsonsafe.UntrustedJSONError:
            raise self._invalid("is not whole JSON (truncated?)") from None
        if not isinstance(document, dict) or not isinstance(document.get("mac"), str):
            raise self._invalid("is not a channel state file")
        mac = document.pop("mac")
        if not hmac.compare_digest(mac.encode(), self._mac(document).encode()):
            raise self._invalid("does not verify under this wallet (tampered, or another's)")
        try:
            return self._book(document)
        except (KeyError, TypeError, ValueError, InvalidOperation, ValidationError):
            raise self._invalid("holds a channel that does not check out") from None

    def _book(self, document: dict[str, Any]) -> SavedBook:
        if document.get("format") != FORMAT or document.get("payer") != self._payer:
            raise ValueError("another format or payer")
        retired = Decimal(document["retired"])
        if not retired.is_finite() or retired < 0:
            raise ValueError("retired")
        channels = [self._record(item) for item in document["channels"]]
        if len({c.key for c in channels}) != len(channels):
            raise ValueError("a channel twice")
        return SavedBook(channels, retired)

    def _record(self, item: dict[str, Any]) -> OpenChannel:
        config = ChannelConfig.model_validate(item["config"])
        origin, network, asset, pay_to = (str(part) for part in item["key"])
        counts = [_count(item[name]) for name in ("deposited", "refunded", "charged", "signed")]
        deposited, refunded, charged, signed = counts
        requirement, resource = item["requirement"], item["resource"]
        chain_id, decimals, confirmed = item["chainId"], item["decimals"], item["confirmed"]
        if (
            to_checksum_address(config.payer) != self._payer
            or to_checksum_address(config.token) != asset
            or to_checksum_address(config.receiver) != pay_to
            or not isinstance(requirement, dict)
            or not (resource is None or isinstance(resource, dict))
            or not isinstance(chain_id, int)
            or not isinstance(decimals, int)
            or not 0 <= decimals <= 36
            or not isinstance(confirmed, bool)
            or ch.channel_id(config, chain_id).lower() != str(item["channelId"]).lower()
            # our own count: never more charged than signed, nor refunded than was left
            or charged > signed
            or refunded + charged > deposited
        ):
            raise ValueError("inconsistent channel")
        return OpenChannel(
            (origin, network, asset, pay_to),
            PayerChannel(self._account, config, chain_id, charged=charged),
            requirement,
            resource,
            str(item["url"]),
            decimals,
            deposited=deposited,
            refunded=refunded,
            signed=signed,
            confirmed=confirmed,
        )

    # --- writing ---------------------------------------------------------------------------

    def encode(self, channels: list[OpenChannel], retired: Decimal) -> bytes:
        """The file's bytes for ``channels`` and ``retired``: a snapshot, taken while their
        count is steady (ValueError: it would not fit)."""
        document: dict[str, Any] = {
            "format": FORMAT,
            "payer": self._payer,
            "retired": str(retired),
            "channels": [_item(c) for c in channels],
        }
        document["mac"] = self._mac(document)
        data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        if len(data) > MAX_STATE_BYTES:
            raise ValueError(f"the channel state would pass {MAX_STATE_BYTES} bytes")
        return data

    def write(self, data: bytes) -> None:
        """Replace the file with ``data`` atomically and durably: blocking, two fsyncs
        (ValueError: the file was let go)."""
        if self._held is None:
            raise ValueError("the channel state was let go (the transport is closed)")
        files.replace_atomically(self.path, data)

    def _mac(self, document: dict[str, Any]) -> str:
        canonical = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
        return hmac.new(self._mac_key, canonical, hashlib.sha256).hexdigest()

    def _invalid(self, why: str) -> ChannelStateInvalid:
        return ChannelStateInvalid(f"the channel state {self.path.name} {why}")


def offer_fits(requirement: dict[str, Any], resource: dict[str, Any] | None) -> bool:
    """Whether a channel's offer is small enough to keep."""
    size = len(json.dumps(requirement)) + len(json.dumps(resource))
    return size <= MAX_OFFER_BYTES


def _item(channel: OpenChannel) -> dict[str, Any]:
    return {
        "key": list(channel.key),
        "channelId": channel.channel_id,
        "config": channel.payer.config.wire(),
        "chainId": channel.payer.chain_id,
        "requirement": channel.requirement,
        "resource": channel.resource,
        "url": channel.url,
        "decimals": channel.decimals,
        "deposited": str(channel.deposited),
        "refunded": str(channel.refunded),
        "charged": str(channel.payer.charged),
        "signed": str(channel.signed),
        "confirmed": channel.confirmed,
    }


def _count(value: object) -> int:
    if not isinstance(value, str) or not value.isdigit() or len(value) > 78:
        raise ValueError("not an atomic amount")
    return int(value)
