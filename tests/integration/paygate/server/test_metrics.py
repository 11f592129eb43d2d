"""/metrics after a paid, sealed run: parsed with prometheus_client's own parser, the
histograms and counters the operator's dashboards read are there with the right values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.ops_support import paid_sealed_run
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_stack

CHAT = "POST /v1/chat/completions"


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _value(samples, name: str, **labels: str) -> float:
    matching = [v for got, v in samples.get(name, []) if labels.items() <= got.items()]
    assert matching, f"{name}{labels} missing"
    return sum(matching)


async def test_metrics_after_a_paid_sealed_run(facilitator, usdc, payer, seller, tmp_path):
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "payments.db"
    ) as stack:
        await paid_sealed_run(stack.url, payer)
        async with stack.client.get(stack.url + "/metrics") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    for name in (
        "paygate_request_duration_seconds",
        "paygate_overhead_seconds",
        "paygate_first_chunk_seconds",
        "paygate_upstream_latency_seconds",
        "paygate_settlement_seconds",
        "paygate_key_operation_seconds",
    ):
        assert families.get(name) == "histogram", name
    samples = _samples(text)
    for name in (
        "paygate_request_duration_seconds_count",
        "paygate_overhead_seconds_count",
        "paygate_first_chunk_seconds_count",
        "paygate_upstream_latency_seconds_count",
    ):
        assert _value(samples, name, route=CHAT) >= 2, name
    assert _value(samples, "paygate_request_duration_seconds_bucket", route=CHAT, le="+Inf") >= 2
    # The transport asks once (402), then pays each request.
    assert _value(samples, "paygate_payments_total", outcome="admitted", scheme="exact") == 2
    assert _value(samples, "paygate_payments_total", outcome="payment_required") >= 1
    assert _value(samples, "paygate_settlement_seconds_count", outcome="settled") == 2
    assert (
        _value(samples, "paygate_earned_atomic_total", network="eip155:84532", asset=usdc.address)
        == 2 * PRICE_ATOMIC
    )
    assert _value(samples, "paygate_settlements_pending") == 0
    assert (
        _value(samples, "paygate_key_operation_seconds_count", backend="software", operation="ecdh")
        >= 2
    )
    # The names that existed before keep working.
    assert _value(samples, "paygate_requests_total", route=CHAT, status="200") == 2
    assert _value(samples, "paygate_request_envelopes_total", envelope="v2") == 2
    assert _value(samples, "paygate_errors_total", code="payment_required") >= 1
    assert _value(samples, "paygate_in_flight") == 0
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC


async def test_each_app_has_its_own_registry(facilitator, seller, tmp_path):
    async with (
        paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "a.db") as a,
        paid_stack(seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "b.db") as b,
    ):
        for _ in range(3):
            async with a.client.get(a.url + "/health"):
                pass
        async with b.client.get(b.url + "/metrics") as response:
            samples = _samples(await response.text())
    assert not [
        labels
        for labels, _ in samples.get("paygate_requests_total", [])
        if labels["route"] == "GET /health"
    ]
