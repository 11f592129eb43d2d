"""Untrusted JSON: every document a caller, a facilitator or an RPC node sends is parsed here.

Three bounds, each checked before the document can hurt: its size (before parsing), its depth
and its numbers. The parser is orjson, which does not recurse on the C stack and stops at 1,024
levels whatever ``sys.getrecursionlimit()`` says (a dependency of web3 raises that to 100,000,
which lets the standard library's ``json`` overflow the C stack on a deeply nested body), and
which refuses integers beyond 64 bits that do not fit a double (a 5,000-digit integer is an
error, not a 500 from ``int()``'s digit limit later). Documents that are walked or serialised
again are held to a much smaller ``max_depth``, checked iteratively after parsing.

One error class, :class:`UntrustedJSONError` (a ``ValueError``), whose message never quotes the
document.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from paygate.errors import PaygateError

#: Nesting deep enough for every protocol document paygate reads (x402 payloads, 402 bodies,
#: key documents, receipts, RPC answers), shallow enough to walk and re-serialise safely.
MAX_DEPTH = 32
#: orjson's own hard limit: what a document parsed with ``max_depth=None`` can reach.
PARSER_DEPTH_LIMIT = 1024


class UntrustedJSONError(PaygateError, ValueError):
    """The document is too large, too deep, or not JSON (the message never quotes it)."""

    message = "the document is too large, too deep, or not JSON"

    code = "invalid_json"


def loads(
    data: bytes | bytearray | memoryview | str, *, max_bytes: int, max_depth: int | None = MAX_DEPTH
) -> Any:
    """Parse ``data`` within the bounds, or raise :class:`UntrustedJSONError`.

    ``max_depth=None`` leaves only the parser's own limit (1,024): for large bodies of which
    only the top level is read (the ``model`` of a request priced by model).
    """
    if isinstance(data, str):
        if len(data) > max_bytes:  # a str has at least as many UTF-8 bytes as characters
            raise UntrustedJSONError(f"the JSON document exceeds {max_bytes} bytes")
        try:
            data = data.encode()
        except UnicodeEncodeError:
            raise UntrustedJSONError("the JSON document is not valid UTF-8") from None
    if len(data) > max_bytes:
        raise UntrustedJSONError(f"the JSON document exceeds {max_bytes} bytes")
    try:
        value = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        if "depth" in str(exc) or "recursion" in str(exc):
            raise UntrustedJSONError("the JSON document is nested too deeply") from None
        raise UntrustedJSONError("the JSON document is not valid JSON") from None
    if max_depth is not None and _may_exceed(data, max_depth) and depth(value) > max_depth:
        raise UntrustedJSONError(f"the JSON document is nested deeper than {max_depth} levels")
    return value


def _may_exceed(data: bytes | bytearray | memoryview, max_depth: int) -> bool:
    # Fewer openers than the bound cannot nest deeper than it: no walk for most documents.
    raw = bytes(data)
    return raw.count(b"[") + raw.count(b"{") > max_depth


def depth(value: Any) -> int:
    """Nesting depth of a parsed document (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        level += 1
        deepest = max(deepest, level)
        stack.extend((child, level) for child in children)
    return deepest


def dumps_compact(value: Any) -> bytes:
    """``value`` as compact JSON (no spaces, keys in their order): by orjson, a few µs less than
    the standard library on the paid path; by ``json`` where orjson refuses (an integer beyond
    64 bits). Both parse back to the same document."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(value, separators=(",", ":")).encode()
