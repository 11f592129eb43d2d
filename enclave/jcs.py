"""RFC 8785 (JCS) canonical JSON, with a fast path for the documents receipts and digests
are made of.

``rfc8785.dumps`` serializes in Python, one value at a time. For a document of dicts with
ASCII keys, lists, strings, booleans, None and integers of at most 53 bits (no floats),
orjson with sorted keys writes the same bytes (UTF-8, no spaces, no ASCII escaping): keys of
ASCII sort the same by UTF-16 code units as by code points, and both escape exactly ``"``,
``\\`` and the controls below U+0020 (``\\b \\t \\n \\f \\r`` short, the rest as lower-case
``\\u00xx``); orjson writes a receipt in a tenth of the time of the standard library's C
encoder. Anything else — floats, big integers, non-ASCII keys, other types, lone surrogates —
goes to ``rfc8785``, which canonicalizes or refuses it.
"""

from __future__ import annotations

from typing import Any

import orjson
import rfc8785

_MAX_INT = 2**53 - 1  # JCS numbers are IEEE doubles: exact up to here
_DEPTH = 64


_LEAVES = frozenset({str, bool, type(None)})


def plain(value: Any, depth: int = 0) -> bool:
    """The value has only what the fast path encodes exactly as JCS does: dicts of ASCII keys,
    lists, strings, booleans, None, integers of at most 53 bits (scalars are checked in the
    containers' loops: a call per leaf was most of a receipt's canonicalisation)."""
    kind = type(value)
    if kind in _LEAVES:
        return True
    if kind is int:
        return -_MAX_INT <= value <= _MAX_INT
    if depth > _DEPTH:
        return False
    if kind is dict:
        for key in value:
            if type(key) is not str or not key.isascii():
                return False
        items = value.values()
    elif kind is list:
        items = value
    else:
        return False
    for item in items:
        kind = type(item)
        if kind in _LEAVES:
            continue
        if kind is int:
            if not -_MAX_INT <= item <= _MAX_INT:
                return False
        elif not plain(item, depth + 1):
            return False
    return True


def dumps(document: Any) -> bytes:
    """The RFC 8785 bytes of ``document`` (``rfc8785``'s errors for what JCS refuses)."""
    if plain(document):
        try:
            return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:  # a lone surrogate: rfc8785 refuses it in its own words
            pass
    return rfc8785.dumps(document)
