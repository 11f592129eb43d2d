"""Which addresses' payment claims admission believes (paygate.server.claims): an address
whose claim was refused is admitted as unpaid until its doubt runs out or a payment from it
verifies; the record is bounded."""

from __future__ import annotations

import math

import pytest

from paygate.config import ConfigError, load_settings
from paygate.server.claims import DoubtedClaims


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_claim_is_doubted_until_its_time_runs_out() -> None:
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, clock=clock)
    assert claims.believed("10.0.0.1")
    claims.refused("10.0.0.1")
    assert not claims.believed("10.0.0.1")
    assert claims.believed("10.0.0.2")  # per address
    clock.now += 59.0
    assert not claims.believed("10.0.0.1")
    clock.now += 1.0
    assert claims.believed("10.0.0.1")
    assert len(claims) == 0  # forgotten once it ran out


def test_a_verified_payment_clears_the_doubt_and_a_new_refusal_restarts_it() -> None:
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, clock=clock)
    claims.refused("10.0.0.1")
    claims.verified("10.0.0.1")
    assert claims.believed("10.0.0.1")
    claims.refused("10.0.0.1")
    clock.now += 50.0
    claims.refused("10.0.0.1")  # refused again: 60 s from now
    clock.now += 50.0
    assert not claims.believed("10.0.0.1")


def test_the_record_is_bounded_and_forgets_the_oldest_first() -> None:
    claims = DoubtedClaims(max_addresses=3, clock=Clock())
    for n in range(5):
        claims.refused(f"10.0.0.{n}")
    assert len(claims) == 3
    assert claims.believed("10.0.0.0")
    assert claims.believed("10.0.0.1")
    assert not any(claims.believed(f"10.0.0.{n}") for n in (2, 3, 4))


@pytest.mark.parametrize("name", ["claimed_opens_per_second", "unpaid_opens_per_second"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, "greater than 0"),
        (-1.0, "greater than 0"),
        (math.nan, "finite number"),
        (math.inf, "finite number"),
        ("inf", "finite number"),
        ("1e400", "finite number"),
    ],
)
def test_an_open_rate_that_is_no_rate_is_refused(name: str, value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: .*{error}"):
        load_settings(None, **{name: value})


def test_the_claimed_open_rate_is_its_own_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(None).claimed_opens_per_second == 50.0
    monkeypatch.setenv("PAYGATE_CLAIMED_OPENS_PER_SECOND", "25.5")
    settings = load_settings(None)
    assert settings.claimed_opens_per_second == 25.5
    assert settings.unpaid_opens_per_second == 10.0
    monkeypatch.setenv("PAYGATE_CLAIMED_OPENS_PER_SECOND", "nan")
    with pytest.raises(ConfigError, match="claimed_opens_per_second"):
        load_settings(None)


def test_which_refusals_of_a_claim_doubt_its_address() -> None:
    from paygate.server.claims import doubts
    from paygate.server.errors import GatewayError, TooManyUploads, UploadsBusy

    def refusal(status: int) -> GatewayError:
        error = GatewayError("refused")
        error.status = status
        return error

    # The sender's doing: a body or payment no good, an outcome already recorded, a payer's rate.
    assert all(doubts(refusal(status)) for status in (400, 402, 409, 429))
    # Not the sender's doing, or nothing opened: a dependency down, the gate's own refusals.
    assert not any(doubts(refusal(status)) for status in (500, 502, 503, 504))
    assert not doubts(TooManyUploads())
    assert not doubts(UploadsBusy())
