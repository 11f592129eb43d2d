"""The fast canonical JSON writes exactly rfc8785's bytes, and refuses what it refuses."""

from __future__ import annotations

from typing import Any

import pytest
import rfc8785
from hypothesis import given
from hypothesis import strategies as st

from enclave import jcs

_KEYS = st.text(max_size=12)  # any text: non-ASCII keys take rfc8785's path
_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**60), max_value=2**60)  # beyond 2**53: refused by both
    | st.text()  # controls, quotes, backslashes, astral characters, lone surrogates
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=4),
    max_leaves=20,
)


def _nested(depth: int) -> Any:
    document: Any = 1
    for _ in range(depth):
        document = [document]
    return document


def _either(dump: Any, document: Any) -> tuple[str, bytes | str]:
    try:
        return "ok", dump(document)
    except Exception as exc:
        return "refused", type(exc).__name__


@given(_DOCUMENTS)
def test_the_fast_path_writes_rfc8785s_bytes_or_refuses_alike(document: Any) -> None:
    assert _either(jcs.dumps, document) == _either(rfc8785.dumps, document)


@pytest.mark.parametrize(
    "document",
    [
        {"b": 1, "a": [True, None, 'x\u001f"\\\n\u007f\u2028'], "Z": {"é": "ü"}},
        {"\ue000": 1, "\U0001f600": 2},  # sorted by UTF-16 code units, not code points
        {"n": 2**53 - 1, "m": -(2**53 - 1)},
        {"f": 1.5},
        {1: "non-string key"},
        ("a", "tuple"),
        "\ud800",
        {"a": ["x\udc00"]},
        _nested(70),  # deeper than the fast path walks
    ],
)
def test_the_edges_agree(document: Any) -> None:
    assert _either(jcs.dumps, document) == _either(rfc8785.dumps, document)
