"""Rate limits (in memory, per client address and per payer) and daily budgets (durable, in the
ledger) hold under a concurrent burst: the 429s are counted, nothing passes the limit, nothing
is overspent, and an unpaid flood from one address is limited before any body is read."""

from __future__ import annotations

import asyncio

import pytest

from tests.fixtures.payment_support import PRICE_ATOMIC, paid_stack, post, records, v2_header

HITS = "POST /v1/chat/completions"


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


async def test_unpaid_challenges_are_rate_limited_per_address(facilitator, seller, ledger):
    limits = {"*": {"per_ip": 60, "burst": 5}}
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, rate_limits=limits
    ) as stack:
        answers = await asyncio.gather(*(post(stack, None) for _ in range(20)))
        served = stack.fake.hits[HITS]
    statuses = [status for status, _, _ in answers]
    assert statuses.count(402) == 5
    assert statuses.count(429) == 15
    limited = next(headers for status, headers, _ in answers if status == 429)
    assert int(limited["Retry-After"]) >= 1
    assert limited["x-ratelimit-limit-requests"] == "5"
    assert limited["x-ratelimit-remaining-requests"] == "0"
    assert limited["x-ratelimit-reset-requests"].endswith("s")
    assert limited["X-Paygate-Error"] == "rate_limited"
    assert served == 0


async def test_a_payer_over_its_rate_gets_429_and_keeps_its_authorization(
    facilitator, usdc, payer, seller, ledger
):
    limits = {"*": {"per_payer": 60, "burst": 3}}
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, rate_limits=limits
    ) as stack:
        headers = [await v2_header(stack, payer) for _ in range(10)]
        answers = await asyncio.gather(*(post(stack, header) for header in headers))
        served = stack.fake.hits[HITS]
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 3 + [429] * 7
    assert served == 3
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
    assert len(await records(ledger)) == 3  # refused before the reservation


async def test_a_daily_budget_is_never_overspent_by_a_concurrent_burst(
    facilitator, usdc, payer, seller, ledger
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        payer_daily_budget="0.0035",  # three and a half requests at 0.001
    ) as stack:
        headers = [await v2_header(stack, payer) for _ in range(10)]
        answers = await asyncio.gather(*(post(stack, header) for header in headers))
        served = stack.fake.hits[HITS]
    statuses = sorted(status for status, _, _ in answers)
    assert statuses == [200] * 3 + [429] * 7
    refused = next(h for status, h, _ in answers if status == 429)
    assert refused["X-Paygate-Error"] == "budget_exceeded"
    assert 1 <= int(refused["Retry-After"]) <= 86_400
    assert served == 3
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC


async def test_another_payer_has_its_own_budget_and_bucket(
    facilitator, usdc, payer, seller, ledger, anvil
):
    from paygate_dev.chain.accounts import new_account

    other = new_account()
    anvil.mint(other.address, 10_000_000)
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        payer_daily_budget="0.001",
        rate_limits={"*": {"per_payer": 60, "burst": 1}},
    ) as stack:
        first = [await post(stack, await v2_header(stack, p)) for p in (payer, other)]
        again = await post(stack, await v2_header(stack, payer))
    assert [status for status, _, _ in first] == [200, 200]
    assert again[0] == 429
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC


async def test_a_model_limit_applies_to_exact_payments_too(
    facilitator, usdc, payer, seller, ledger
):
    limits = {"model:fake-llama": {"per_payer": 60, "burst": 1}}
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=ledger, rate_limits=limits
    ) as stack:
        first = await post(stack, await v2_header(stack, payer))
        second = await post(stack, await v2_header(stack, payer))
    assert first[0] == 200
    assert (second[0], second[1]["X-Paygate-Error"]) == (429, "rate_limited")
    assert usdc.balance_of(seller) == PRICE_ATOMIC


async def test_released_authorizations_do_not_overspend_across_midnight(
    facilitator, usdc, payer, seller, tmp_path
):
    import time

    import aiohttp

    from paygate.config import load_settings
    from paygate.server.assembly import x402_payments
    from paygate.x402.facilitator import FacilitatorSettler
    from paygate.x402.ledger_sqlite import SqliteLedger
    from tests.fixtures.chain import encode_header, sign_v2_payment
    from tests.fixtures.payment_support import CHAT_BODY, challenge_of, paid_settings

    day = 86_400
    real = time.time()
    # The gateway's clock (processor and ledger alike): one minute before a UTC midnight.
    offset = [(real - real % day + day - 60) - real]

    def clock() -> float:
        return time.time() + offset[0]

    values = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "payments.db",
        payer_daily_budget="0.0035",  # three and a half requests at 0.001
        max_timeout_seconds=3 * day,  # authorizations that outlive the night
    )
    settings = load_settings(None, **values)
    ledger = await SqliteLedger.open(tmp_path / "payments.db", clock=clock)
    async with aiohttp.ClientSession() as session:
        settler = FacilitatorSettler(session, facilitator.url, timeout=2.0, settle_timeout=5.0)
        payments = x402_payments(settings, ledger=ledger, settler=settler, clock=clock)
        failing = {**CHAT_BODY, "model": "fake-error-500"}
        async with paid_stack(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=tmp_path / "payments.db",
            payments=payments,
        ) as stack:
            headers = []
            for _ in range(4):  # yesterday: four authorizations, each released (upstream 500)
                required = await challenge_of(stack, body=failing)
                header = encode_header(
                    sign_v2_payment(
                        payer, required["accepts"][0], resource=required["resource"]["url"]
                    )
                )
                status, _, _ = await post(stack, header, json=failing)
                assert status == 500
                headers.append(header)
            offset[0] += 120  # past midnight: a new budget day
            answers = [await post(stack, header) for header in headers]
        await ledger.close()
    statuses = [status for status, _, _ in answers]
    assert statuses == [200, 200, 200, 429]  # today's budget, however old the records
    assert answers[3][1]["X-Paygate-Error"] == "budget_exceeded"
    assert usdc.balance_of(seller) == 3 * PRICE_ATOMIC
