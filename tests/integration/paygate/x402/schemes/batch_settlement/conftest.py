"""Fixtures the batch-settlement tests on anvil share."""

from __future__ import annotations

import pytest


@pytest.fixture
def rewound(anvil):
    """The chain (its clock too) put back after the test: the next one's authorizations are
    dated by the wall clock, and a chain rolled back or forked by a test is undone."""
    snapshot = anvil.rpc("evm_snapshot")
    yield
    anvil.rpc("evm_revert", [snapshot])
