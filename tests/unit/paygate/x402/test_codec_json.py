"""The header codec's JSON: orjson where it writes the standard library's exact bytes, the
standard library's encoder everywhere else (a header's bytes never depend on which wrote it)."""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paygate.x402 import codec
from paygate.x402.models import SettleResponse
from paygate.x402.offers import challenge
from tests.fixtures.x402_support import RESOURCE, terms

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)  # past 53 and 64 bits
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()  # controls, quotes, DEL, non-ASCII, astral characters, lone surrogates
)
_DOCUMENTS = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _reference(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


@given(_DOCUMENTS)
def test_compact_json_is_the_standard_librarys_bytes(document: Any) -> None:
    assert codec.compact_json(document) == _reference(document)


@pytest.mark.parametrize(
    "document",
    [
        "\x7f",  # printable ASCII for orjson, escaped by json.dumps
        {"b": ["x\x7fy", '\x00\x1f\n"\\'], "a": 1},
        {"n": 2**53, "m": 2**64, "f": 1.0, "e": 1e16},
        "\ud800",
        {"\u00e9": "ascii value, non-ASCII key"},
        {"z": {"y": {"x": []}}, "A": None},
    ],
)
def test_the_edges_are_the_standard_librarys_bytes(document: Any) -> None:
    assert codec.compact_json(document) == _reference(document)


def test_headers_are_the_bytes_they_were() -> None:
    everything = ("base", "base-sepolia", "ethereum", "polygon", "polygon-amoy", "avalanche")
    offers = terms(*everything).offers(Decimal("0.001"))
    required = challenge(offers, RESOURCE, error="payment_required").v2
    receipts = [
        SettleResponse(success=True, transaction="0x" + "ab" * 32, network="eip155:8453"),
        SettleResponse(
            success=False,
            error_reason="invalid_transaction_state",
            error_message="réseau \u2028 indisponible \U0001f600 \x00\x7f",
            network="eip155:84532",
            extra={"chargedAmount": "10", "ratio": 0.5, "big": 2**80},
        ),
    ]
    for model in [required, *receipts]:
        encoded = codec.encode(model)
        assert base64.b64decode(encoded) == _reference(model.wire())
