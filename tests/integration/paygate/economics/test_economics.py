"""The economics controls on real components (anvil + the SDK facilitator, the FAKE model
server, SQLite or PostgreSQL 15): token limits and budgets shared through the ledger hold across
two replicas and across two `paygate serve` workers; shadow mode records would-be refusals and
refuses nothing; a webhook alert reaches a local receiver once per event, signed; an
unreachable webhook blocks nothing."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import aiohttp
import pytest

from paygate import wire
from paygate.economics import alerts as webhook
from paygate.economics.open_store import economics_store
from paygate.server.app import ALERTS
from paygate.x402.ledger import PaymentState, review_error
from paygate.x402.ledger_store import open_ledger, parse_ledger_url
from tests.fixtures.economics_support import SECRET, gateways, webhook_receiver
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC, paid_settings, v2_header
from tests.fixtures.scale_support import Env, fake_upstream, replicas, sign
from tests.fixtures.serve_support import make_key


async def pay_and_post(client: aiohttp.ClientSession, url: str, payer: object) -> tuple[int, dict]:
    stack = SimpleNamespace(client=client, url=url)
    header = await v2_header(stack, payer)
    async with client.post(
        url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
    ) as response:
        body = await response.read()
        document = json.loads(body) if body else {}
        return response.status, {"headers": response.headers, "body": document}


async def limit_events(ledger_url: str) -> list:
    ledger = await open_ledger(parse_ledger_url(ledger_url), replica="test-reader")
    try:
        return await economics_store(ledger).limit_events(since=0, limit=100)
    finally:
        await ledger.close()


async def test_a_token_limit_holds_across_two_replicas_on_postgresql(
    facilitator, usdc, payer, seller, pg_url
):
    async with aiohttp.ClientSession() as client:
        # What one request costs in tokens: the FAKE server's usage is deterministic.
        async with gateways(
            1, **paid_settings(seller=seller, facilitator_url=facilitator.url, ledger=pg_url)
        ) as [(_, url)]:
            status, first = await pay_and_post(client, url, payer)
            assert status == 200
        usage = first["body"]["usage"]
        per_request = usage["prompt_tokens"] + 2 * usage["completion_tokens"]
        # Two more requests fit (the first one already counted), the window is then full.
        limits = {"*": {"per_payer": 3 * per_request, "output_weight": 2}}
        settings = paid_settings(
            seller=seller, facilitator_url=facilitator.url, ledger=pg_url, token_limits=limits
        )
        async with gateways(2, **settings) as [(_, a), (_, b)]:
            assert (await pay_and_post(client, a, payer))[0] == 200
            assert (await pay_and_post(client, b, payer))[0] == 200
            # The first request was not counted: no limit was configured then. Both replicas
            # see the two counted since.
            assert (await pay_and_post(client, a, payer))[0] == 200
            refused_b, answer_b = await pay_and_post(client, b, payer)
            refused_a, answer_a = await pay_and_post(client, a, payer)
    assert (refused_a, refused_b) == (429, 429)
    for answer in (answer_a, answer_b):
        assert answer["headers"]["X-Paygate-Error"] == "token_limit_exceeded"
        assert int(answer["headers"]["Retry-After"]) >= 1
    assert usdc.balance_of(seller) == 4 * PRICE_ATOMIC  # refused before any reservation
    events = await limit_events(pg_url)
    assert {(e.kind, e.rule, e.enforced) for e in events} == {("tokens", "*", True)}
    assert len(events) == 2


@pytest.mark.parametrize("window", ["day", "month"])
async def test_a_budget_holds_across_two_replicas_on_postgresql(
    facilitator, usdc, payer, seller, pg_url, window
):
    budgets = {window: {"per_payer": "0.0025"}}  # two and a half requests at 0.001
    settings = paid_settings(
        seller=seller, facilitator_url=facilitator.url, ledger=pg_url, budgets=budgets
    )
    async with gateways(2, **settings) as [(_, a), (_, b)], aiohttp.ClientSession() as client:
        headers = [
            await v2_header(SimpleNamespace(client=client, url=u), payer) for u in [a, b] * 5
        ]

        async def post(url: str, header: str) -> tuple[int, str | None]:
            async with client.post(
                url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
            ) as response:
                await response.read()
                return response.status, response.headers.get("X-Paygate-Error")

        answers = await asyncio.gather(
            *(post(url, h) for url, h in zip([a, b] * 5, headers, strict=True))
        )
    assert sorted(status for status, _ in answers) == [200] * 2 + [429] * 8
    assert {code for status, code in answers if status == 429} == {"budget_exceeded"}
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
    events = await limit_events(pg_url)
    assert {(e.kind, e.rule, e.enforced) for e in events} == {("budget", window, True)}


async def test_a_monthly_budget_holds_across_two_workers(
    facilitator, usdc, payer, seller, tmp_path
):
    url = f"sqlite:///{tmp_path / 'ledger' / 'payments.db'}"
    async with fake_upstream() as (_fake, upstream):
        env = Env(make_key(tmp_path / "key.pem"), url, seller, facilitator.url, upstream, tmp_path)
        env.extra["PAYGATE_BUDGETS"] = json.dumps({"month": {"per_payer": "0.0035"}})
        async with replicas(env, ["w"], workers=2) as (parent,), aiohttp.ClientSession() as client:
            assert len(parent.children()) == 2
            headers = [await sign(client, parent.url, payer) for _ in range(10)]
            connector = aiohttp.TCPConnector(limit=10, force_close=True)  # spread over workers
            async with aiohttp.ClientSession(connector=connector) as burst:

                async def post(header: str) -> int:
                    async with burst.post(
                        parent.url + CHAT, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: header}
                    ) as response:
                        await response.read()
                        return response.status

                statuses = await asyncio.gather(*(post(h) for h in headers))
    assert sorted(statuses) == [200] * 3 + [429] * 7
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


async def test_shadow_mode_records_would_be_refusals_and_refuses_nothing(
    facilitator, usdc, payer, seller, tmp_path
):
    ledger_url = f"sqlite:///{tmp_path / 'payments.db'}"
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger_url,
        token_limits={"*": {"per_payer": 1, "shadow": True}},
        budgets={"day": {"per_payer": "0.0015", "shadow": True}},
    )
    async with gateways(1, **settings) as [(_, url)], aiohttp.ClientSession() as client:
        statuses = [(await pay_and_post(client, url, payer))[0] for _ in range(4)]
        async with client.get(url + "/metrics") as response:
            metrics = await response.text()
    assert statuses == [200] * 4
    assert usdc.balance_of(seller) == 4 * PRICE_ATOMIC
    events = await limit_events(ledger_url)
    assert events
    assert not [e for e in events if e.enforced]
    kinds = [e.kind for e in events]
    # Requests 2-4 found the token window full, and would each have passed the day's budget.
    assert kinds.count("tokens") == 3
    assert kinds.count("budget") == 3
    assert 'paygate_limit_events_total{kind="tokens",mode="shadow"} 3.0' in metrics
    assert 'paygate_limit_events_total{kind="budget",mode="shadow"} 3.0' in metrics


async def flag_for_review(ledger_url: str, payer: str) -> str:
    """A payment the way a crash leaves one whose outcome nobody can prove: SETTLING, flagged."""
    ledger = await open_ledger(parse_ledger_url(ledger_url), replica="test-writer")
    try:
        record = await ledger.reserve(
            network="eip155:84532",
            asset="0x036CbD53842c5426634e7929541eC2318f3dCF7e",
            payer=payer,
            nonce="0x" + "ab" * 32,
            pay_to=payer,
            amount=1000,
            x402_version=2,
            route="chat.completions",
            payload="{}",
            requirements="{}",
            idempotency_key=None,
        )
        await ledger.transition(record.id, PaymentState.VERIFIED)
        await ledger.transition(record.id, PaymentState.SERVED)
        await ledger.transition(
            record.id, PaymentState.SETTLING, error=review_error("facilitator said unknown")
        )
        return record.id
    finally:
        await ledger.close()


async def test_an_alert_reaches_the_webhook_once_per_event_signed(pg_url, facilitator, seller):
    async with webhook_receiver() as receiver:
        settings = paid_settings(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=pg_url,
            alert_webhook=receiver.url,
            alert_webhook_secret=SECRET.decode(),
            alert_interval_seconds=1,
        )
        async with gateways(2, **settings) as stacks:
            payment_id = await flag_for_review(pg_url, seller)
            key = f"review:{payment_id}"
            # Both replicas' watchers see the flagged payment; the ledger claim lets one send.
            async with asyncio.timeout(20):
                while not (
                    receiver.documents("payment_review")
                    and all(key in app[ALERTS]._seen for app, _ in stacks)
                ):
                    await asyncio.sleep(0.05)
            assert sum(app[ALERTS].sent for app, _ in stacks) == 1
    alerts = receiver.documents("payment_review")
    assert len(alerts) == 1
    assert alerts[0]["facts"]["payment_id"] == payment_id
    assert alerts[0]["facts"]["reason"] == "facilitator said unknown"
    headers, body = receiver.received[0]
    assert webhook.verify(SECRET, headers[webhook.SIGNATURE_HEADER], body, now=time.time())
    assert not webhook.verify(
        b"another secret", headers[webhook.SIGNATURE_HEADER], body, now=time.time()
    )
    assert not webhook.verify(
        SECRET, headers[webhook.SIGNATURE_HEADER], body + b" ", now=time.time()
    )


async def test_a_budget_reached_is_alerted_once_however_often_it_refuses(
    facilitator, payer, seller, tmp_path
):
    ledger_url = f"sqlite:///{tmp_path / 'payments.db'}"
    async with webhook_receiver() as receiver:
        settings = paid_settings(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=ledger_url,
            budgets={"day": {"per_payer": "0.001"}},
            alert_webhook=receiver.url,
            alert_webhook_secret=SECRET.decode(),
        )
        async with gateways(1, **settings) as [(app, url)], aiohttp.ClientSession() as client:
            statuses = [(await pay_and_post(client, url, payer))[0] for _ in range(3)]
            async with asyncio.timeout(20):
                while not receiver.documents("budget_reached"):
                    await asyncio.sleep(0.05)
            alerts = app[ALERTS]
            async with asyncio.timeout(20):
                while alerts._queue.qsize():
                    await asyncio.sleep(0.05)
    assert statuses == [200, 429, 429]
    [alert] = receiver.documents("budget_reached")
    assert alert["facts"] == {"payer": payer.address, "window": "day", "enforced": True}


async def test_an_unreachable_webhook_blocks_no_request(facilitator, payer, seller, tmp_path):
    from tests.fixtures.components import free_port

    ledger_url = f"sqlite:///{tmp_path / 'payments.db'}"
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger_url,
        budgets={"day": {"per_payer": "0.001", "shadow": True}},
        alert_webhook=f"http://127.0.0.1:{free_port()}/nobody",
        alert_webhook_secret=SECRET.decode(),
    )
    async with gateways(1, **settings) as [(_, url)], aiohttp.ClientSession() as client:
        statuses = [(await pay_and_post(client, url, payer))[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
