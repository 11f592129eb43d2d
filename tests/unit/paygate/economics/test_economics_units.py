"""The economics controls' pure parts and the webhook delivery (against a local receiver)."""

from __future__ import annotations

import asyncio
import calendar
import time
from decimal import Decimal

import pytest

from paygate.config import ConfigError, load_settings
from paygate.economics import alerts as webhook
from paygate.economics.controls import Controls, TokenLimit, window_start
from paygate.economics.store import percentile
from tests.fixtures.economics_support import SECRET, webhook_receiver


def test_windows_are_utc_days_and_months_including_december():
    moment = calendar.timegm((2026, 12, 31, 23, 59, 59))
    assert window_start("day", moment) == (
        calendar.timegm((2026, 12, 31, 0, 0, 0)),
        calendar.timegm((2027, 1, 1, 0, 0, 0)),
    )
    assert window_start("month", moment) == (
        calendar.timegm((2026, 12, 1, 0, 0, 0)),
        calendar.timegm((2027, 1, 1, 0, 0, 0)),
    )
    assert window_start("month", calendar.timegm((2026, 2, 1, 0, 0, 0)))[1] == calendar.timegm(
        (2026, 3, 1, 0, 0, 0)
    )
    with pytest.raises(ValueError, match="window"):
        window_start("week", moment)


def test_token_rules_match_every_model_and_the_named_one_only():
    controls = Controls(
        token_limits={"*": TokenLimit(per_payer=10), "model:a": TokenLimit(per_model=5)}
    )
    assert [key for key, _ in controls.token_rules("a")] == ["*", "model:a"]
    assert [key for key, _ in controls.token_rules("b")] == ["*"]
    assert [key for key, _ in controls.token_rules(None)] == ["*"]
    assert controls.needs_model
    assert TokenLimit(per_payer=1, output_weight=Decimal(3)).weigh(2, 5) == 17


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("token_limits", {"models:x": {"per_payer": 1}}, "keys are"),
        ("token_limits", {"*": {}}, "per_payer and/or per_model"),
        ("token_limits", {"*": {"per_payer": 0}}, "greater than 0"),
        ("token_limits", {"*": {"per_payer": -1}}, "greater than 0"),
        (
            "token_limits",
            {"*": {"per_payer": 5, "input_weight": 0, "output_weight": 0}},
            "weight",
        ),
        ("budgets", {"week": {"per_payer": "1"}}, "budgets"),
        ("budgets", {"day": {"per_payer": "-1"}}, "greater than or equal"),
        ("alert_webhook", "http://alerts.example.com/hook", "https"),
        ("alert_webhook", "ftp://127.0.0.1/hook", "http"),
        ("console_wallets", "0x1234", "console_wallets"),
        ("console_listen", "nope", "host:port"),
    ],
)
def test_bad_economics_and_console_settings_are_refused(setting, value, message):
    with pytest.raises(ConfigError, match=message):
        load_settings(None, **{setting: value})


def test_the_webhook_url_is_redacted_from_logs_as_a_secret():
    settings = load_settings(
        None,
        alert_webhook="https://hooks.example.com/services/T000/B000/XXXXXXXXSECRET",
        alert_webhook_secret="s3cret-value",
    )
    found = settings.log_secrets()
    assert "XXXXXXXXSECRET" in found
    assert "s3cret-value" in found
    assert "XXXXXXXXSECRET" not in repr(settings)


def test_a_signature_names_its_time_and_fails_for_anything_else():
    body = b'{"kind":"budget_reached"}'
    now = int(time.time())
    header = webhook.sign(SECRET, now, body)
    assert webhook.verify(SECRET, header, body, now=now)
    assert not webhook.verify(SECRET, header, body, now=now + 301)  # replayed later
    assert not webhook.verify(SECRET, header.replace(f"t={now}", f"t={now + 1}"), body, now=now)
    assert not webhook.verify(SECRET, "garbage", body, now=now)
    assert not webhook.verify(SECRET, "t=,v1=", body, now=now)


def test_percentile_is_nearest_rank():
    assert percentile([], 0.5) is None
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.95) == 4.0


def _alerts(url: str) -> webhook.WebhookAlerts:
    return webhook.WebhookAlerts(
        url, SECRET, replica="r1", attempts=4, first_backoff=0.01, max_backoff=0.02, timeout=2
    )


async def _drain(alerts: webhook.WebhookAlerts, done) -> None:
    task = asyncio.get_running_loop().create_task(alerts.run())
    try:
        async with asyncio.timeout(10):
            while not done():
                await asyncio.sleep(0.01)
    finally:
        task.cancel()


async def test_a_failed_delivery_is_retried_with_backoff_until_it_is_taken():
    async with webhook_receiver() as receiver:
        receiver.answers = [503, 429, 500]
        alerts = _alerts(receiver.url)
        alerts.notify(webhook.Alert("upstream_down", "k1", "the model server is down"))
        await _drain(alerts, lambda: alerts.sent == 1)
    assert len(receiver.received) == 4
    ids = {headers[webhook.ALERT_ID_HEADER] for headers, _ in receiver.received}
    assert len(ids) == 1  # the same alert each time: the receiver can deduplicate
    for headers, body in receiver.received:
        assert webhook.verify(SECRET, headers[webhook.SIGNATURE_HEADER], body, now=time.time())


async def test_a_refusing_receiver_is_not_asked_again_and_a_key_is_sent_once():
    async with webhook_receiver() as receiver:
        receiver.answers = [400]
        alerts = _alerts(receiver.url)
        alerts.notify(webhook.Alert("budget_reached", "k1", "refused"))
        alerts.notify(webhook.Alert("budget_reached", "k1", "the same event again"))
        alerts.notify(webhook.Alert("budget_reached", "k2", "another event"))
        await _drain(alerts, lambda: alerts.failed == 1 and alerts.sent == 1)
    assert [d["summary"] for d in receiver.documents()] == ["refused", "another event"]


def test_a_full_queue_drops_the_alert_without_blocking():
    alerts = webhook.WebhookAlerts("http://127.0.0.1:9/x", SECRET, replica="r", max_queue=2)
    for index in range(5):
        alerts.notify(webhook.Alert("budget_reached", f"k{index}", "x"))  # never raises
    assert alerts._queue.qsize() == 2
