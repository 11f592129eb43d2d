"""RFC 8785 (JCS) canonical JSON, with a fast path for the documents receipts and digests
are made of.

``rfc8785.dumps`` serializes in Python, one value at a time. For a document of dicts with
ASCII keys, lists, strings, booleans, None and integers of at most 53 bits (no floats), the
standard library's C encoder with sorted keys, no spaces and no ASCII escaping writes the same
bytes: keys of ASCII sort the same by UTF-16 code units as by code points, and both escape
exactly ``"``, ``\\`` and the controls below U+0020 (``\\b \\t \\n \\f \\r`` short, the rest as
lower-case ``\\u00xx``). Anything else — floats, big integers, non-ASCII keys, other types, lone
surrogates — goes to ``rfc8785``, which canonicalizes or refuses it.
"""

from __future__ import annotations

import json
from typing import Any

import rfc8785

_MAX_INT = 2**53 - 1  # JCS numbers are IEEE doubles: exact up to here
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, sort_keys=True, separators=(",", ":"), check_circular=False
)
_DEPTH = 64


def _plain(value: Any, depth: int = 0) -> bool:
    """The value has only what the fast path encodes exactly as JCS does."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return -_MAX_INT <= value <= _MAX_INT
    if depth > _DEPTH:
        return False
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str or not key.isascii() or not _plain(item, depth + 1):
                return False
        return True
    if kind is list:
        return all(_plain(item, depth + 1) for item in value)
    return False


def dumps(document: Any) -> bytes:
    """The RFC 8785 bytes of ``document`` (``rfc8785``'s errors for what JCS refuses)."""
    if _plain(document):
        try:
            return _ENCODER.encode(document).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: rfc8785 refuses it in its own words
            pass
    return rfc8785.dumps(document)
