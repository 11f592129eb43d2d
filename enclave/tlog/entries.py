"""What the appliance logs: versioned entries in canonical JSON (RFC 8785, ``rfc8785``).

Every entry is an object with ``v`` (1), ``type`` and ``time`` (Unix seconds), and ``replica``
(the replica that appended it):

* ``release``: ``paygate_version``, ``wheel_sha256`` (or null), ``code_digest``,
  ``image_digest`` (or null), ``engine`` {``kind``, ``digest`` or null}, ``weights``
  [{``name``, ``digest``}], ``config_digest``: what code and configuration served.
* ``key-epoch``: ``sealing_key`` and ``receipt_key`` (hex points), ``log_key`` (the vkey),
  ``evidence_kind`` and ``evidence_digest`` (SHA-256 of the canonical evidence document made
  at start for the nonce :func:`epoch_nonce`): which keys served from when.
* ``receipts``: ``root`` (RFC 6962 root over the leaf hashes of the period's signed receipts,
  each leaf the exact signed bytes), ``count``, ``charged`` (the sum of the receipts' payment
  amounts, atomic units, as a decimal string) and ``from``/``to`` (the times of the period's
  first and last receipt). A receipt belongs to the first period logged after it was stored.

:func:`parse` checks every field; an entry that does not parse proves nothing.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import rfc8785

from enclave.errors import EnclaveError

VERSION = 1
MAX_ENTRY = 16 * 1024
TYPES = ("release", "key-epoch", "receipts")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_POINT = re.compile(r"04[0-9a-f]{128}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,77}")

_FIELDS: dict[str, frozenset[str]] = {
    "release": frozenset(
        {
            "paygate_version", "wheel_sha256", "code_digest", "image_digest", "engine",
            "weights", "config_digest",
        }
    ),
    "key-epoch": frozenset(
        {"sealing_key", "receipt_key", "log_key", "evidence_kind", "evidence_digest"}
    ),
    "receipts": frozenset({"root", "count", "charged", "from", "to"}),
}  # fmt: skip
_COMMON = frozenset({"v", "type", "time", "replica"})


class EntryInvalid(EnclaveError, ValueError):
    code = "log_entry_invalid"
    message = "the log entry is malformed"


def encode(kind: str, time: int, replica: str, fields: Mapping[str, Any]) -> bytes:
    document = {"v": VERSION, "type": kind, "time": int(time), "replica": replica, **fields}
    data = rfc8785.dumps(document)
    parse(data)  # what is logged must be what a reader accepts
    return data


def release(
    *,
    time: int,
    replica: str,
    paygate_version: str,
    code_digest: str,
    config_digest: str,
    weights: Sequence[tuple[str, str]],
    engine_kind: str,
    engine_digest: str | None = None,
    wheel_sha256: str | None = None,
    image_digest: str | None = None,
) -> bytes:
    return encode(
        "release",
        time,
        replica,
        {
            "paygate_version": paygate_version,
            "wheel_sha256": wheel_sha256,
            "code_digest": code_digest,
            "image_digest": image_digest,
            "engine": {"kind": engine_kind, "digest": engine_digest},
            "weights": [{"name": n, "digest": d} for n, d in weights],
            "config_digest": config_digest,
        },
    )


def key_epoch(
    *,
    time: int,
    replica: str,
    sealing_key: bytes,
    receipt_key: bytes,
    log_key: str,
    evidence_kind: str,
    evidence_digest: str,
) -> bytes:
    return encode(
        "key-epoch",
        time,
        replica,
        {
            "sealing_key": sealing_key.hex(),
            "receipt_key": receipt_key.hex(),
            "log_key": log_key,
            "evidence_kind": evidence_kind,
            "evidence_digest": evidence_digest,
        },
    )


def receipts(
    *,
    time: int,
    replica: str,
    root: bytes,
    count: int,
    charged: int,
    start: int,
    end: int,
) -> bytes:
    return encode(
        "receipts",
        time,
        replica,
        {
            "root": root.hex(),
            "count": count,
            "charged": str(charged),
            "from": start,
            "to": end,
        },
    )


def epoch_nonce(sealing_key: bytes, receipt_key: bytes, log_key: str) -> bytes:
    """The nonce of the key epoch's evidence: derived from the keys, so anyone holding the
    evidence document can check that it was made for this epoch."""
    material = b"paygate key-epoch v1\n" + sealing_key + receipt_key + log_key.encode()
    return hashlib.sha256(material).digest()


def parse(data: bytes) -> dict[str, Any]:
    """The entry's fields, checked; :class:`EntryInvalid` otherwise."""
    if len(data) > MAX_ENTRY:
        raise EntryInvalid("the entry is too large")
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise EntryInvalid("the entry is not JSON") from None
    if not isinstance(document, dict) or document.get("v") != VERSION:
        raise EntryInvalid("the entry is not a version 1 object")
    kind = document.get("type")
    if kind not in _FIELDS or set(document) != _COMMON | _FIELDS[kind]:
        raise EntryInvalid("the entry has missing or unknown fields")
    if rfc8785.dumps(document) != data:
        raise EntryInvalid("the entry is not canonical JSON")
    _int(document["time"])
    _text(document["replica"])
    check = {"release": _release, "key-epoch": _key_epoch, "receipts": _receipts}[kind]
    check(document)
    return document


def _release(d: Mapping[str, Any]) -> None:
    _text(d["paygate_version"])
    _digest(d["code_digest"])
    _digest(d["config_digest"])
    for name in ("wheel_sha256", "image_digest"):
        if d[name] is not None:
            _digest(d[name])
    engine = d["engine"]
    if not isinstance(engine, dict) or set(engine) != {"kind", "digest"}:
        raise EntryInvalid("engine is not {kind, digest}")
    _text(engine["kind"])
    if engine["digest"] is not None:
        _digest(engine["digest"])
    weights = d["weights"]
    if not isinstance(weights, list) or len(weights) > 256:
        raise EntryInvalid("weights is not a list")
    for item in weights:
        if not isinstance(item, dict) or set(item) != {"name", "digest"}:
            raise EntryInvalid("a weights item is not {name, digest}")
        _text(item["name"])
        _digest(item["digest"])


def _key_epoch(d: Mapping[str, Any]) -> None:
    for name in ("sealing_key", "receipt_key"):
        if not isinstance(d[name], str) or not _POINT.fullmatch(d[name]):
            raise EntryInvalid(f"{name} is not an uncompressed P-256 point in hex")
    _text(d["log_key"], 4096)
    _text(d["evidence_kind"])
    _digest(d["evidence_digest"])


def _receipts(d: Mapping[str, Any]) -> None:
    if not isinstance(d["root"], str) or not _HEX64.fullmatch(d["root"]):
        raise EntryInvalid("root is not 32 bytes in hex")
    for name in ("count", "from", "to"):
        _int(d[name])
    if not isinstance(d["charged"], str) or not _DECIMAL.fullmatch(d["charged"]):
        raise EntryInvalid("charged is not a decimal string")
    if d["count"] < 1 or d["from"] > d["to"]:
        raise EntryInvalid("a receipts entry covers at least one receipt, from <= to")


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 63:
        raise EntryInvalid("a number field is not a non-negative integer")
    return value


def _text(value: Any, limit: int = 256) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise EntryInvalid("a text field is empty, too long or not a string")
    return value


def _digest(value: Any) -> str:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise EntryInvalid("a digest is not sha256:<64 lower-case hex digits>")
    return value
