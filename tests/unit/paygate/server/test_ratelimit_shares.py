"""With ``--workers N`` each worker enforces its share of every rate limit (its own buckets,
no shared state), so that the host as a whole never admits more than the configured rate,
whichever worker each request reaches."""

from __future__ import annotations

import itertools
import random

import pytest

from paygate.server.ratelimit import Rate, RateLimited, RateLimitTable, TokenBuckets

ANY = "*"


def table(burst: int, per_minute: float = 60.0) -> RateLimitTable:
    return RateLimitTable(per_ip={ANY: Rate(per_minute, burst)}, per_payer={})


@pytest.mark.parametrize(("burst", "workers"), list(itertools.product(range(1, 40), range(1, 9))))
def test_the_shares_add_up_to_the_configured_rate(burst: int, workers: int) -> None:
    shares = [table(burst, 90.0).share(w, workers).per_ip[ANY] for w in range(1, workers + 1)]
    assert sum(s.per_minute for s in shares) == pytest.approx(90.0)
    if burst >= workers:
        assert sum(s.burst for s in shares) == burst
        assert max(s.burst for s in shares) - min(s.burst for s in shares) <= 1
        assert table(burst).share_warning(workers) is None
    else:  # each worker admits at least one: said at start
        assert [s.burst for s in shares] == [1] * workers
        assert f"up to {workers} at once" in str(table(burst).share_warning(workers))


def test_one_worker_keeps_the_configured_rate_and_payer_limits_are_shared_too() -> None:
    rates = RateLimitTable(
        per_ip={ANY: Rate(30.0, 7)}, per_payer={"model:m": Rate(12.0, 5), ANY: Rate(6.0, 2)}
    )
    assert rates.share(1, 1) == rates
    second = rates.share(2, 2)
    assert second.per_ip == {ANY: Rate(15.0, 3)}
    assert second.per_payer == {"model:m": Rate(6.0, 2), ANY: Rate(3.0, 1)}
    for worker in (0, 3, -1):
        with pytest.raises(ValueError, match="worker"):
            rates.share(worker, 2)


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_workers_together_never_admit_more_than_the_host_s_rate(workers: int) -> None:
    # Requests from one address at random times, each reaching a random worker (the kernel's
    # choice): over any stretch of t seconds the host admits at most burst + rate * t.
    burst, per_minute = 12, 30.0
    now = [0.0]
    buckets = [
        TokenBuckets(table(burst, per_minute).share(w, workers).per_ip[ANY], clock=lambda: now[0])
        for w in range(1, workers + 1)
    ]
    rng = random.Random(workers)
    admitted: list[float] = []
    for _ in range(3000):
        now[0] += rng.expovariate(5.0)  # ~5 a second: ten times the rate
        if rng.choice(buckets).take("198.51.100.7").allowed:
            admitted.append(now[0])
    assert admitted  # the limit admits, it does not only refuse
    for i, start in enumerate(admitted):
        for j in range(i, len(admitted)):
            within = j - i + 1
            assert within <= burst + per_minute / 60.0 * (admitted[j] - start) + 1e-9


def test_each_worker_builds_its_share_and_the_first_says_what_cannot_be_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from paygate.config import Settings
    from paygate.server.assembly import rate_limits

    settings = Settings(workers=4, rate_limits={"*": {"per_ip": 8, "burst": 2}})
    with caplog.at_level("WARNING", logger="paygate.server"):
        limits = [rate_limits(settings, worker) for worker in (1, 2, 3, 4)]
    warnings = [r.getMessage() for r in caplog.records if "burst below workers" in r.message]
    assert warnings == [
        "rate_limits *: burst below workers (4): each worker admits at least one at once,"
        " so up to 4 at once from one host"
    ]
    # Worker 1 of 4: a quarter of the rate, one at once; taken a second time, refused.
    first = limits[0]
    assert first is not None
    first.check_address("POST /v1/chat/completions", "198.51.100.7")
    with pytest.raises(RateLimited, match="too many requests from this address") as refused:
        first.check_address("POST /v1/chat/completions", "198.51.100.7")
    assert refused.value.headers["x-ratelimit-limit-requests"] == "1"
    assert rate_limits(Settings(workers=4)) is None
