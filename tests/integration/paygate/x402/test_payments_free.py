"""The free quota: a wallet that proves itself with x402's sign-in-with-x extension (signed by
the official SDK's SIWX client) gets N free requests a day, durable in the ledger; then it pays.
A forged, replayed or foreign sign-in gets nothing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import aiohttp
import pytest
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header

from paygate import wire
from tests.fixtures.payment_support import CHAT, CHAT_BODY, challenge_of, paid_stack

HITS = "POST /v1/chat/completions"


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


async def signed_in(stack, account) -> str:
    """A fresh SIGN-IN-WITH-X header, built by the SDK from a fresh 402's declaration."""
    required = await challenge_of(stack)
    declared = required["extensions"]["sign-in-with-x"]
    info = {**declared["info"], **declared["supportedChains"][0]}
    payload = await create_siwx_payload(info, account, stack.url + CHAT)
    return encode_siwx_header(payload)


async def send(stack, header: str | None) -> tuple[int, dict]:
    headers = {wire.SIGN_IN_WITH_X: header} if header else {}
    async with stack.client.post(
        stack.url + CHAT, json=CHAT_BODY, headers=headers, timeout=aiohttp.ClientTimeout(total=30)
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_a_signed_in_wallet_gets_its_free_requests_then_pays(
    facilitator, payer, seller, ledger
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=2,
        public_url="self",
    ) as stack:
        answers = [await send(stack, await signed_in(stack, payer)) for _ in range(3)]
        served = stack.fake.hits[HITS]
    assert [status for status, _ in answers] == [200, 200, 402]
    assert [h.get(wire.FREE_REMAINING_HEADER) for _, h in answers[:2]] == ["1", "0"]
    assert answers[2][1][wire.ERROR_HEADER] == "free_quota_exhausted"
    assert served == 2
    # Durable: another gateway on the same ledger knows the quota is spent.
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=2,
        public_url="self",
    ) as stack:
        status, headers = await send(stack, await signed_in(stack, payer))
    assert status == 402
    assert headers[wire.ERROR_HEADER] == "free_quota_exhausted"


async def test_a_concurrent_burst_gets_exactly_the_quota(facilitator, payer, seller, ledger):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=3,
        public_url="self",
    ) as stack:
        headers = [await signed_in(stack, payer) for _ in range(10)]
        answers = await asyncio.gather(*(send(stack, h) for h in headers))
        served = stack.fake.hits[HITS]
    assert sorted(status for status, _ in answers) == [200] * 3 + [402] * 7
    assert served == 3


async def test_forged_replayed_and_foreign_sign_ins_get_nothing(facilitator, payer, seller, ledger):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=5,
        public_url="self",
    ) as stack:
        good = await signed_in(stack, payer)
        assert (await send(stack, good))[0] == 200
        replayed = await send(stack, good)
        proof = json.loads(base64.b64decode(good))
        forged = {**proof, "address": seller}  # claims another wallet
        foreign = {**proof, "domain": "evil.example", "nonce": "a" * 32}
        answers = [
            (await send(stack, base64.b64encode(json.dumps(doc).encode()).decode()))
            for doc in (forged, foreign)
        ]
        garbage = await send(stack, "not base64 ***")
        served = stack.fake.hits[HITS]
    assert replayed[0] == 402
    assert replayed[1][wire.ERROR_HEADER] == "invalid_siwx_nonce"
    assert [h[wire.ERROR_HEADER] for _, h in answers] == [
        "invalid_siwx_signature",  # the signature recovers the payer, not the claimed wallet
        "invalid_siwx_domain_mismatch",
    ]
    assert garbage[0] == 402
    assert garbage[1][wire.ERROR_HEADER] == "invalid_siwx_payload"
    assert served == 1


# --- issue 21: the free quota hardened ----------------------------------------------------


def test_a_free_quota_without_public_url_refuses_to_start(seller):
    from pydantic import ValidationError

    from paygate.config import Settings

    with pytest.raises(ValidationError, match="public_url"):
        Settings(payment_mode="facilitator", pay_to=seller, free_requests_per_day=1)


async def sign_in_for(account, info: dict, url: str) -> str:
    return encode_siwx_header(await create_siwx_payload(info, account, url))


async def test_a_sign_in_for_another_site_is_refused_whatever_the_host_header(
    facilitator, payer, seller, ledger
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=5,
        public_url="self",
    ) as stack:
        required = await challenge_of(stack)
        declared = required["extensions"]["sign-in-with-x"]
        ours = {**declared["info"], **declared["supportedChains"][0]}
        # Signed for evil.example (a nonce of ours, even), sent with Host: evil.example.
        foreign = {**ours, "domain": "evil.example", "uri": "http://evil.example/v1/chat"}
        header = await sign_in_for(payer, foreign, "http://evil.example/v1/chat/completions")
        answers = []
        for host in (None, "evil.example"):
            extra = {"Host": host} if host else {}
            async with stack.client.post(
                stack.url + CHAT,
                json=CHAT_BODY,
                headers={wire.SIGN_IN_WITH_X: header, **extra},
            ) as response:
                answers.append((response.status, response.headers.get(wire.ERROR_HEADER)))
        served = stack.fake.hits[HITS]
    assert answers == [(402, "invalid_siwx_domain_mismatch")] * 2
    assert served == 0


async def test_a_nonce_this_gateway_never_issued_is_refused(facilitator, payer, seller, ledger):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=5,
        public_url="self",
    ) as stack:
        required = await challenge_of(stack)
        declared = required["extensions"]["sign-in-with-x"]
        info = {**declared["info"], **declared["supportedChains"][0]}
        made_up = await sign_in_for(payer, {**info, "nonce": "f" * 48}, stack.url + CHAT)
        # One character changed (never to itself: an issued nonce may end in "0" already).
        flipped = info["nonce"][:-1] + ("1" if info["nonce"].endswith("0") else "0")
        tampered = await sign_in_for(payer, {**info, "nonce": flipped}, stack.url + CHAT)
        answers = [await send(stack, h) for h in (made_up, tampered)]
        served = stack.fake.hits[HITS]
    assert [(s, h[wire.ERROR_HEADER]) for s, h in answers] == [(402, "invalid_siwx_nonce")] * 2
    assert served == 0


async def test_twenty_fresh_wallets_from_one_address_share_its_allowance(
    facilitator, seller, ledger
):
    from paygate_dev.chain.accounts import new_account

    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=2,
        public_url="self",
    ) as stack:
        wallets = [new_account() for _ in range(20)]
        answers = [await send(stack, await signed_in(stack, w)) for w in wallets for _ in (1, 2)]
        served = stack.fake.hits[HITS]
    assert [status for status, _ in answers].count(200) == 2  # the address's 2, not 40
    assert served == 2


async def test_ipv6_rotation_in_one_64_is_one_client_behind_a_trusted_proxy(
    facilitator, seller, ledger
):
    from paygate_dev.chain.accounts import new_account

    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=3,
        public_url="self",
        trusted_proxies="127.0.0.1",
    ) as stack:
        answers = []
        for n in range(12):
            # a fresh wallet and a fresh address of one /64 each time
            headers = {
                wire.SIGN_IN_WITH_X: await signed_in(stack, new_account()),
                "X-Forwarded-For": f"2001:db8:1:2::{n + 1:x}",
            }
            async with stack.client.post(
                stack.url + CHAT, json=CHAT_BODY, headers=headers
            ) as response:
                answers.append(response.status)
        other = {
            wire.SIGN_IN_WITH_X: await signed_in(stack, new_account()),
            "X-Forwarded-For": "2001:db8:1:3::1",  # the next /64: another client
        }
        async with stack.client.post(stack.url + CHAT, json=CHAT_BODY, headers=other) as response:
            another = response.status
    assert answers.count(200) == 3
    assert another == 200


async def test_a_free_sign_in_buys_one_batch_item_not_a_batch(facilitator, payer, seller, ledger):
    item = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}]}
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=5,
        public_url="self",
    ) as stack:
        answers = []
        for items in ([item] * 3, [item]):
            headers = {wire.SIGN_IN_WITH_X: await signed_in(stack, payer)}
            async with stack.client.post(
                stack.url + "/v1/batch/chat/completions", json=items, headers=headers
            ) as response:
                answers.append((response.status, response.headers.get(wire.ERROR_HEADER)))
        served = stack.fake.hits[HITS]
    assert answers == [(402, "free_quota_one_item"), (200, None)]
    assert served == 1


async def test_refused_sign_ins_spend_nothing_of_the_address_s_allowance(
    facilitator, payer, seller, ledger
):
    # Replaying a used sign-in, or signing in with a wallet whose own quota is used, must not
    # use up the allowance of everyone behind the same address (a NAT, a /64).
    from paygate_dev.chain.accounts import new_account

    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=2,
        free_requests_per_address_per_day=3,
        public_url="self",
    ) as stack:
        good = await signed_in(stack, payer)
        first = await send(stack, good)
        replays = [await send(stack, good) for _ in range(4)]
        wallet = [await send(stack, await signed_in(stack, payer)) for _ in range(4)]
        fresh = [await send(stack, await signed_in(stack, new_account())) for _ in range(2)]
        served = stack.fake.hits[HITS]
    assert first[0] == 200
    assert {(s, h[wire.ERROR_HEADER]) for s, h in replays} == {(402, "invalid_siwx_nonce")}
    # The wallet's second request, then its own quota is used.
    assert [(s, h.get(wire.ERROR_HEADER)) for s, h in wallet] == [(200, None)] + [
        (402, "free_quota_exhausted")
    ] * 3
    # The address's 3: the wallet's two, one fresh wallet's; the next pays.
    assert [s for s, _ in fresh] == [200, 402]
    assert served == 3


# --- retention: the day-keyed rows do not grow without bound -------------------------------


def day_rows(path) -> dict[str, list]:
    """The free quota's day-keyed rows in the ledger file: days, and nonces' use times."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return {
            "free_quota": sorted(r[0] for r in db.execute("SELECT day FROM free_quota")),
            "free_addresses": sorted(r[0] for r in db.execute("SELECT day FROM free_addresses")),
            "signin_nonces": sorted(r[0] for r in db.execute("SELECT used_at FROM signin_nonces")),
        }


async def test_the_keeper_prunes_days_before_yesterday(facilitator, payer, seller, ledger):
    from paygate.x402.ledger_store import LedgerLocation, open_ledger

    now = time.time()
    old = time.strftime("%Y-%m-%d", time.gmtime(now - 3 * 86_400))
    yesterday = time.strftime("%Y-%m-%d", time.gmtime(now - 86_400))
    # Rows an earlier run left: three days ago (to go) and yesterday (to stay).
    for day, at in ((old, now - 3 * 86_400), (yesterday, now - 86_400)):
        async with await open_ledger(
            LedgerLocation(kind="sqlite", path=ledger), clock=lambda at=at: at
        ) as earlier:
            for n in range(3):
                await earlier.take_free(
                    payer=f"0x{n + 1:040x}",
                    nonce=f"{day}-{n}",
                    day=day,
                    limit=2,
                    address=f"{n:064x}",
                    address_limit=2,
                )
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=ledger,
        free_requests_per_day=2,
        public_url="self",
        ledger_prune_interval_seconds=0.1,
    ) as stack:
        assert (await send(stack, await signed_in(stack, payer)))[0] == 200
        for _ in range(300):  # the keeper's passes, every 0.1 s: at most 30 s
            rows = day_rows(ledger)
            if old not in rows["free_quota"]:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.3)  # more passes: today's and yesterday's rows stay
        rows = day_rows(ledger)
        # Today's count survives the passes: the wallet has one free request left.
        status, headers = await send(stack, await signed_in(stack, payer))
    today = time.strftime("%Y-%m-%d", time.gmtime(time.time()))
    assert status == 200
    assert headers[wire.FREE_REMAINING_HEADER] == "0"
    assert old not in rows["free_quota"] + rows["free_addresses"]
    assert rows["free_quota"].count(yesterday) == 3
    assert rows["free_addresses"].count(yesterday) == 3
    assert today in rows["free_quota"]
    assert today in rows["free_addresses"]
    assert min(rows["signin_nonces"]) > now - 2 * 86_400  # the old day's nonces went
    assert len(rows["signin_nonces"]) == 4  # yesterday's three and today's
