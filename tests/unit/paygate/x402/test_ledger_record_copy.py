"""A move's record is the current one with the move's fields changed: the ledger's own copy
(``ledger_rules._replaced``, read in one call) is ``dataclasses.replace``'s, field for field,
whatever is changed — so a field added to the record later is carried by every move."""

from __future__ import annotations

import dataclasses
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from paygate.x402 import ledger_rules
from paygate.x402.ledger import PaymentRecord, PaymentState

NAMES = [f.name for f in dataclasses.fields(PaymentRecord)]
_VALUES = st.one_of(st.none(), st.integers(), st.text(max_size=8), st.sampled_from(PaymentState))


def _record(values: list[Any]) -> PaymentRecord:
    return PaymentRecord(*values)


@given(
    st.lists(_VALUES, min_size=len(NAMES), max_size=len(NAMES)),
    st.dictionaries(st.sampled_from(NAMES), _VALUES),
)
def test_a_changed_copy_is_dataclasses_replaces(values: list[Any], changes: dict[str, Any]) -> None:
    current = _record(values)
    copied = ledger_rules._replaced(current, **changes)
    assert copied == dataclasses.replace(current, **changes)
    for name in NAMES:  # also the fields equality does not compare
        assert getattr(copied, name) is getattr(dataclasses.replace(current, **changes), name)
