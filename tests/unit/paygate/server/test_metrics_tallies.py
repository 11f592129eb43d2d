"""The request path's series are tallied in plain numbers and added at scrape time: what a
scrape shows is exactly what prometheus_client shows when every value is recorded at once —
the same buckets (a value on a bound counts in that bound's bucket), counts and sums — and a
second scrape counts nothing twice."""

from __future__ import annotations

import math
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from paygate.server.metrics import KEY_BUCKETS, MAX_OUTCOMES, REQUEST_BUCKETS, Metrics
from paygate.upstream.usage import Usage

ROUTE = "POST /v1/chat/completions"
# Below, on and just above bounds, the smallest and beyond the largest.
SECONDS = (0.0, 0.005, 0.0050001, 0.01, 0.3, 1.0, 2.5, 299.9, 300.0, 301.0, 1e9)


def _samples(text: bytes, prefix: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if sample.name.startswith(prefix) and not sample.name.endswith("_created"):
                out[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _direct() -> bytes:
    """The same values recorded straight into prometheus_client, series by series."""
    registry = CollectorRegistry()
    duration = Histogram(
        "paygate_request_duration_seconds",
        "d",
        ("route",),
        buckets=REQUEST_BUCKETS,
        registry=registry,
    )
    requests = Counter("paygate_requests", "r", ("route", "status"), registry=registry)
    tokens = Counter("paygate_tokens", "t", ("kind",), registry=registry)
    for seconds in SECONDS:
        duration.labels(ROUTE).observe(seconds)
    for status in (200, 200, 502):
        requests.labels(ROUTE, str(status)).inc()
    tokens.labels("prompt").inc(7)
    tokens.labels("completion").inc(11)
    return generate_latest(registry)


def test_a_scrape_shows_what_direct_recording_shows() -> None:
    metrics = Metrics()
    for seconds in SECONDS:
        metrics.duration(ROUTE, seconds)
    for status in (200, 200, 502):
        metrics.observe(ROUTE, status)
    metrics.usage(Usage(prompt_tokens=7, completion_tokens=11))

    shown = metrics.render(in_flight=0)
    expected = _direct()
    for prefix in ("paygate_request_duration_seconds", "paygate_requests", "paygate_tokens"):
        got, want = _samples(shown, prefix), _samples(expected, prefix)
        assert want
        assert set(got) == set(want)
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-12), key
    assert _samples(shown, "paygate_usage_replies_total") == {
        ("paygate_usage_replies_total", ()): 1.0
    }


def test_a_second_scrape_counts_nothing_twice_and_adds_what_came_since() -> None:
    metrics = Metrics()
    metrics.observe(ROUTE, 200)
    metrics.first_chunk(ROUTE, 0.02)
    metrics.render(in_flight=0)
    metrics.observe(ROUTE, 200)
    again = _samples(metrics.render(in_flight=0), "paygate_")
    assert again["paygate_requests_total", (("route", ROUTE), ("status", "200"))] == 2.0
    assert again["paygate_first_chunk_seconds_count", (("route", ROUTE),)] == 1.0
    # Any reader of the registry sees the tallies, not only render.
    metrics.overhead(ROUTE, 0.001)
    assert (
        metrics.registry.get_sample_value("paygate_overhead_seconds_count", {"route": ROUTE}) == 1.0
    )


def test_a_negative_count_is_refused_where_it_is_made() -> None:
    metrics = Metrics()
    with pytest.raises(ValueError, match="non-negative"):
        metrics.usage(Usage(prompt_tokens=-1, completion_tokens=0))


def test_key_operations_from_the_loop_and_from_executor_threads_all_show() -> None:
    """An inline key's ECDH reports on the main thread (tallied), a TPM's or token's from an
    executor thread (recorded at once): a scrape shows both, in the same series."""
    metrics = Metrics()
    metrics.key_operation("software", "ecdh", 0.0002)
    metrics.key_operation("software", "ecdh", 0.00005)
    worker = threading.Thread(target=metrics.key_operation, args=("software", "ecdh", 0.003))
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive()

    registry = CollectorRegistry()
    direct = Histogram(
        "paygate_key_operation_seconds",
        "k",
        ("backend", "operation"),
        buckets=KEY_BUCKETS,
        registry=registry,
    )
    for seconds in (0.0002, 0.00005, 0.003):
        direct.labels("software", "ecdh").observe(seconds)
    prefix = "paygate_key_operation_seconds"
    got = _samples(metrics.render(in_flight=0), prefix)
    want = _samples(generate_latest(registry), prefix)
    assert want
    assert set(got) == set(want)
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), key
    # Nothing counted twice by a second scrape.
    assert _samples(metrics.render(in_flight=0), prefix) == got


def test_payment_admissions_are_tallied_per_outcome_and_scheme_across_scrapes() -> None:
    metrics = Metrics()
    for outcome, scheme in (("admitted", "exact"), ("admitted", "exact"), ("other", "none")):
        metrics.admission(outcome, scheme)
    first = _samples(metrics.render(in_flight=0), "paygate_payments_total")
    metrics.admission("admitted", "exact")
    metrics.admission("admitted", "upto")
    again = _samples(metrics.render(in_flight=0), "paygate_payments_total")
    series = "paygate_payments_total"
    assert first == {
        (series, (("outcome", "admitted"), ("scheme", "exact"))): 2.0,
        (series, (("outcome", "other"), ("scheme", "none"))): 1.0,
    }
    assert again == {
        (series, (("outcome", "admitted"), ("scheme", "exact"))): 3.0,
        (series, (("outcome", "admitted"), ("scheme", "upto"))): 1.0,
        (series, (("outcome", "other"), ("scheme", "none"))): 1.0,
    }


def test_a_facilitators_open_set_of_refusal_reasons_keeps_the_outcome_series_bounded() -> None:
    """A refusal's code may be the facilitator's own reason: a facilitator (or a middlebox in
    front of it) answering a new reason every time must not grow the scrape without end."""
    metrics = Metrics()
    for n in range(MAX_OUTCOMES * 4):
        metrics.admission(f"invalid_reason_{n}", "exact")
    metrics.admission("admitted", "exact")  # admissions keep their series past the bound
    got = _samples(metrics.render(in_flight=0), "paygate_payments_total")
    outcomes = {dict(labels)["outcome"] for _, labels in got}
    assert len(outcomes) == MAX_OUTCOMES
    assert sum(got.values()) == MAX_OUTCOMES * 4 + 1  # every admission still counted
    assert got["paygate_payments_total", (("outcome", "admitted"), ("scheme", "exact"))] == 1
    # "admitted" and "other" are two of the bound: the first 62 reasons keep their own series.
    assert got["paygate_payments_total", (("outcome", "invalid_reason_61"), ("scheme", "exact"))]
    assert got["paygate_payments_total", (("outcome", "other"), ("scheme", "exact"))] == (
        MAX_OUTCOMES * 4 - (MAX_OUTCOMES - 2)
    )
