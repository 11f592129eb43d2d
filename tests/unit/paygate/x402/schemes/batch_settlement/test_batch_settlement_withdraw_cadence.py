"""How often the claim loop wakes to learn payers' withdrawals and claim withdrawing channels:
three wakes fit in the shortest withdrawal (less the margin) whatever the claim interval, so a
withdrawal is learnt at one wake and its channel claimed at the next before it can finish."""

from __future__ import annotations

import pytest

from paygate.x402.schemes.batch_settlement.channel import MAX_WITHDRAW_DELAY, MIN_WITHDRAW_DELAY
from paygate.x402.schemes.batch_settlement.claims import WITHDRAW_MARGIN, scan_every


@pytest.mark.parametrize("interval", [0.5, 60.0, 600.0, 86_400.0])
@pytest.mark.parametrize("delay", [MIN_WITHDRAW_DELAY, 3_600, MAX_WITHDRAW_DELAY])
def test_two_wakes_and_the_margin_fit_in_the_withdraw_delay(interval, delay):
    every = scan_every(interval, delay)
    assert 0 < every <= interval
    # Learnt within one wake, claimed at the next, refused for the last wake plus the margin.
    assert 3 * every + WITHDRAW_MARGIN <= delay


def test_a_short_claim_interval_is_kept():
    assert scan_every(60.0, MIN_WITHDRAW_DELAY) == 60.0
    assert scan_every(86_400.0, MIN_WITHDRAW_DELAY) == (MIN_WITHDRAW_DELAY - WITHDRAW_MARGIN) / 3
