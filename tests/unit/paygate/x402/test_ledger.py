"""The payment ledger contract on both stores (a real SQLite file, a real PostgreSQL 15): states,
the replay guard, durability, failures; then what only the SQLite file has (permissions, WAL,
locks)."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import itertools
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest

from paygate.x402.ledger import (
    MAX_LIST_LIMIT,
    AlreadyReserved,
    Budget,
    BudgetExceeded,
    IdempotencyKeyReused,
    LeaseLost,
    LedgerConflict,
    LedgerNotFound,
    LedgerUnavailable,
    Meter,
    PaymentNotFound,
    PaymentRecord,
    PaymentState,
    SignInReused,
    check_limit,
)
from paygate.x402.ledger_base import Ledger
from paygate.x402.ledger_postgres import PostgresLedger
from paygate.x402.ledger_sqlite import SCHEMA_VERSION, SqliteLedger
from tests.fixtures.ledger_support import (
    PATHS,
    PAY_TO,
    PAYER,
    SIGNATURE,
    USDC,
    Clock,
    nonce,
    request,
    tx,
)
from tests.fixtures.ledgers import Opener

S = PaymentState
ROOT = Path(__file__).resolve().parents[4]

# The table of the spec, written out again here rather than imported: the test checks the code.
ALLOWED = {
    (S.RESERVED, S.VERIFIED),
    (S.RESERVED, S.RELEASED),
    (S.RESERVED, S.SETTLING),
    (S.RESERVED, S.FAILED),
    (S.VERIFIED, S.SERVED),
    (S.VERIFIED, S.SETTLING),
    (S.VERIFIED, S.RELEASED),
    (S.VERIFIED, S.FAILED),
    (S.SERVED, S.SETTLING),
    (S.SERVED, S.RELEASED),
    (S.SETTLING, S.SETTLED),
    (S.SETTLING, S.FAILED),
    (S.SETTLING, S.SETTLING),
}


@pytest.fixture
async def ledger(ledger_store: Opener) -> Ledger:
    return await ledger_store()


async def in_state(ledger: Ledger, state: PaymentState, n: int = 1) -> PaymentRecord:
    record = await ledger.reserve(**request(n))
    for step in PATHS[state]:
        record = await ledger.transition(record.id, step, transaction=None)
    assert record.state is state
    return record


# --- reserve and the replay guard -----------------------------------------------------------


async def test_reserve_records_a_new_reservation(ledger: Ledger) -> None:
    record = await ledger.reserve(**request())
    assert record.state is S.RESERVED
    assert (record.served, record.attempts, record.transaction, record.error) == (
        False,
        0,
        None,
        None,
    )
    assert len(record.id) == 32
    assert int(record.id, 16) >= 0
    assert record.key == ("eip155:84532", USDC, PAYER, nonce(1))
    assert (record.pay_to, record.amount, record.x402_version) == (PAY_TO, 1000, 2)
    assert record.created_at == record.updated_at
    assert await ledger.get(record.id) == record


async def test_payment_ids_are_unique_hex_in_creation_order(ledger: Ledger) -> None:
    # Time-ordered ids put new payments at the right edge of every index keyed by the id.
    ids = []
    for n in range(1, 41):
        ids.append((await ledger.reserve(**request(n))).id)
        if n % 10 == 0:
            await asyncio.sleep(0.002)  # a later millisecond
    assert all(len(i) == 32 and set(i) <= set("0123456789abcdef") for i in ids)
    assert len(set(ids)) == len(ids)
    prefixes = [i[:12] for i in ids]  # the creation millisecond
    assert prefixes == sorted(prefixes)
    assert len(set(prefixes)) >= 4
    assert len({i[12:] for i in ids}) == len(ids)  # the random part differs within a millisecond


async def test_reserve_twice_is_a_replay_carrying_the_first_record(ledger: Ledger) -> None:
    first = await ledger.reserve(**request())
    verified = await ledger.transition(first.id, S.VERIFIED)
    with pytest.raises(AlreadyReserved) as caught:
        await ledger.reserve(**request(route="other"))
    assert caught.value.code == "payment_replayed"
    assert caught.value.record == verified
    assert first.id in str(caught.value)


async def test_case_and_network_spelling_do_not_make_a_new_key(ledger: Ledger) -> None:
    first = await ledger.reserve(
        **request(
            network="base-sepolia",
            asset=USDC.lower(),
            payer=PAYER.upper().replace("0X", "0x"),
            nonce=nonce(0xABC).upper().replace("0X", "0x"),
            pay_to=PAY_TO.lower(),
        )
    )
    assert first.key == ("eip155:84532", USDC, PAYER, nonce(0xABC))
    assert first.pay_to == PAY_TO
    with pytest.raises(AlreadyReserved):
        await ledger.reserve(**request(0xABC))
    found = await ledger.find(
        network="EIP155:84532",
        asset=USDC.upper().replace("0X", "0x"),
        payer=PAYER.lower(),
        nonce=nonce(0xABC).upper().replace("0X", "0x"),
    )
    assert found == first
    assert (
        await ledger.find(network="eip155:84532", asset=USDC, payer=PAYER, nonce=nonce(2)) is None
    )


async def test_a_released_authorization_can_be_reserved_again(ledger: Ledger) -> None:
    first = await ledger.reserve(**request())
    released = await ledger.transition(first.id, S.RELEASED, error="upstream_unavailable")
    assert released.error == "upstream_unavailable"
    again = await ledger.reserve(**request(route="embeddings", payload='{"retry":1}'))
    assert (again.id, again.state, again.attempts) == (first.id, S.RESERVED, first.attempts)
    assert (again.route, again.payload, again.error) == ("embeddings", '{"retry":1}', None)
    assert again.created_at == first.created_at
    with pytest.raises(AlreadyReserved):  # re-claimed: a replay of the retry is refused again
        await ledger.reserve(**request())


async def test_fifty_concurrent_reservations_of_one_key_have_one_winner(
    ledger: Ledger,
) -> None:
    results = await asyncio.wait_for(
        asyncio.gather(*(ledger.reserve(**request()) for _ in range(50)), return_exceptions=True),
        timeout=30,
    )
    winners = [r for r in results if isinstance(r, PaymentRecord)]
    replays = [r for r in results if isinstance(r, AlreadyReserved)]
    assert (len(winners), len(replays)) == (1, 49)
    assert {r.record.id for r in replays} == {winners[0].id}
    assert len(await ledger.list()) == 1


async def test_a_cancelled_caller_does_not_undo_a_submitted_change(ledger: Ledger) -> None:
    task = asyncio.create_task(ledger.reserve(**request()))
    await asyncio.sleep(0)  # the call is now queued on the worker thread
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    record = None
    async with asyncio.timeout(10):  # the change was submitted: it lands, cancelled or not
        while record is None:
            record = await ledger.find(
                network="eip155:84532", asset=USDC, payer=PAYER, nonce=nonce(1)
            )
            await asyncio.sleep(0.01)
    assert record.state is S.RESERVED


# --- idempotency keys -----------------------------------------------------------------------


async def test_idempotency_key_rules(ledger: Ledger) -> None:
    key = "pay_7d5d747be160e280504c099d984bcfe0"
    first = await ledger.reserve(**request(1, idempotency_key=key))
    assert await ledger.by_idempotency_key(key) == first
    assert await ledger.by_idempotency_key("pay_unknown_key_0000") is None

    with pytest.raises(IdempotencyKeyReused) as caught:  # same key, another authorization
        await ledger.reserve(**request(2, idempotency_key=key))
    assert caught.value.code == "idempotency_key_reused"
    assert (
        await ledger.find(network="eip155:84532", asset=USDC, payer=PAYER, nonce=nonce(2)) is None
    )

    with pytest.raises(AlreadyReserved) as replay:  # same key, same authorization
        await ledger.reserve(**request(1, idempotency_key=key))
    assert replay.value.record == first

    await ledger.transition(first.id, S.RELEASED)
    again = await ledger.reserve(**request(1, idempotency_key=key))
    assert (again.id, again.state, again.idempotency_key) == (first.id, S.RESERVED, key)


async def test_a_new_key_on_a_retry_replaces_the_old_one(ledger: Ledger) -> None:
    old, new = "a" * 16, "b" * 16
    first = await ledger.reserve(**request(1, idempotency_key=old))
    await ledger.transition(first.id, S.RELEASED)
    kept = await ledger.reserve(**request(1))  # no key given: the old one stays
    assert kept.idempotency_key == old
    await ledger.transition(first.id, S.RELEASED)
    moved = await ledger.reserve(**request(1, idempotency_key=new))
    assert moved.idempotency_key == new
    assert await ledger.by_idempotency_key(old) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("nonce", "0x1234"),
        ("nonce", "1" * 66),
        ("payer", "0x123"),
        ("asset", "not an address"),
        ("pay_to", "0x" + "g" * 40),
        ("network", "bitcoin-mainnet"),
        ("amount", -1),
        ("amount", 2**256),
        ("amount", True),
        ("x402_version", 3),
        ("route", ""),
        ("payload", "x" * (64 * 1024 + 1)),
        ("idempotency_key", "short"),
        ("idempotency_key", "has spaces in it, sixteen+"),
    ],
)
async def test_malformed_input_is_refused_before_the_store(
    ledger: Ledger, field: str, value: Any
) -> None:
    with pytest.raises(ValueError, match=field.split("_")[0]):
        await ledger.reserve(**request(**{field: value}))
    assert await ledger.list() == []


async def test_a_uint256_amount_round_trips(ledger: Ledger) -> None:
    record = await ledger.reserve(**request(amount=2**256 - 1))
    assert (await ledger.get(record.id)) == record
    assert record.amount == 2**256 - 1


# --- transitions ----------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "target"), list(itertools.product(S, S)))
async def test_every_transition_is_allowed_or_refused_by_the_table(
    ledger: Ledger, source: PaymentState, target: PaymentState
) -> None:
    record = await in_state(ledger, source)
    if (source, target) in ALLOWED:
        moved = await ledger.transition(record.id, target)
        assert moved.state is target
        assert moved.updated_at >= record.updated_at
        assert await ledger.get(record.id) == moved
    else:
        with pytest.raises(LedgerConflict) as caught:
            await ledger.transition(record.id, target)
        assert caught.value.code == "ledger_conflict"
        assert f"{source.value} -> {target.value}" in str(caught.value)
        assert await ledger.get(record.id) == record


async def test_settling_counts_attempts_and_keeps_what_is_not_given(ledger: Ledger) -> None:
    record = await in_state(ledger, S.SERVED)
    assert record.served
    first = await ledger.transition(record.id, S.SETTLING)
    assert (first.attempts, first.transaction) == (1, None)
    pending = await ledger.transition(
        record.id,
        S.SETTLING,
        transaction=tx(0xFEED).upper().replace("0X", "0x"),
        error="settlement_pending",
    )
    assert (pending.attempts, pending.transaction, pending.error) == (
        2,
        tx(0xFEED),
        "settlement_pending",
    )
    settled = await ledger.transition(record.id, S.SETTLED)
    assert (settled.attempts, settled.transaction, settled.error) == (
        2,
        tx(0xFEED),
        "settlement_pending",
    )
    assert settled.terminal


async def test_upfront_mode_settles_then_marks_served(ledger: Ledger) -> None:
    record = await ledger.reserve(**request())
    settling = await ledger.transition(record.id, S.SETTLING)
    assert settling.attempts == 1
    settled = await ledger.transition(record.id, S.SETTLED, transaction=tx(1))
    assert not settled.served
    served = await ledger.mark_served(record.id)
    assert (served.state, served.served, served.transaction) == (S.SETTLED, True, tx(1))
    assert (await ledger.mark_served(record.id)).served  # idempotent


async def test_the_reply_an_upfront_payment_bought_is_claimed_once(ledger: Ledger) -> None:
    record = await ledger.reserve(**request())
    await ledger.transition(record.id, S.SETTLING)
    await ledger.transition(record.id, S.SETTLED, transaction=tx(1))
    assert (await ledger.mark_served(record.id, first=True)).served
    with pytest.raises(LeaseLost):  # a second request's reply: not sent
        await ledger.mark_served(record.id, first=True)


async def test_failure_reasons_are_bounded_single_lines(ledger: Ledger) -> None:
    record = await ledger.reserve(**request())
    failed = await ledger.transition(record.id, S.FAILED, error="insufficient_funds\n" + "x" * 500)
    assert failed.error is not None
    assert "\n" not in failed.error
    assert len(failed.error) == 200


async def test_unknown_payment_ids(ledger: Ledger) -> None:
    assert await ledger.get("0" * 32) is None
    for change in (
        ledger.transition("0" * 32, S.VERIFIED),
        ledger.mark_served("'; DROP TABLE payments; --"),
    ):
        with pytest.raises(PaymentNotFound) as caught:
            await change
        assert caught.value.code == "payment_not_found"
        assert isinstance(caught.value, LedgerConflict)
    with pytest.raises(ValueError, match="transaction"):
        await ledger.transition("0" * 32, S.SETTLING, transaction="0xnothex")


# --- queries --------------------------------------------------------------------------------


async def test_unfinished_and_stale_reservations(ledger_store: Opener) -> None:
    clock = Clock()
    ledger = await ledger_store(clock=clock)
    by_state: dict[PaymentState, PaymentRecord] = {}
    for n, state in enumerate(PATHS, start=1):
        by_state[state] = await in_state(ledger, state, n)
        clock.now += 10
    served_early = await ledger.reserve(**request(99))
    await ledger.mark_served(served_early.id)  # upfront-style flag: still a reservation

    unfinished = await ledger.unfinished()
    assert [r.id for r in unfinished] == [by_state[S.SERVED].id, by_state[S.SETTLING].id]
    assert [r.id for r in await ledger.unfinished(limit=1)] == [by_state[S.SERVED].id]

    # now = start + 70; the RESERVED row was last touched at start, VERIFIED at start + 10.
    stale = await ledger.stale_reservations(older_than=60)
    assert [r.id for r in stale] == [by_state[S.RESERVED].id, by_state[S.VERIFIED].id]
    assert [r.id for r in await ledger.stale_reservations(older_than=65)] == [
        by_state[S.RESERVED].id
    ]
    assert len(await ledger.stale_reservations(older_than=0)) == 3
    assert await ledger.stale_reservations(older_than=1000) == []
    with pytest.raises(ValueError, match="older_than"):
        await ledger.stale_reservations(older_than=-1)


async def test_list_is_newest_first_filtered_and_bounded(ledger_store: Opener) -> None:
    clock = Clock()
    ledger = await ledger_store(clock=clock)
    ids = []
    for n in range(1, 6):
        ids.append((await ledger.reserve(**request(n))).id)
        clock.now += 1
    await ledger.transition(ids[1], S.RELEASED)
    assert [r.id for r in await ledger.list()] == ids[::-1]
    assert [r.id for r in await ledger.list(limit=2)] == ids[:2:-1]
    assert [r.id for r in await ledger.list(state=S.RELEASED)] == [ids[1]]
    assert await ledger.list(state=S.SETTLED) == []
    assert len(await ledger.list(limit=10**9)) == 5
    with pytest.raises(ValueError, match="limit"):
        await ledger.list(limit=0)
    assert check_limit(10**9) == MAX_LIST_LIMIT


# --- the SQLite file only ---------------------------------------------------------------------


async def test_records_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "new" / "payments.db"
    ledger = await SqliteLedger.open(path)
    record = await in_state(ledger, S.SETTLING)
    record = await ledger.transition(record.id, S.SETTLING, transaction=tx(7))
    await ledger.close()
    await ledger.close()  # idempotent
    with pytest.raises(LedgerUnavailable, match="closed"):
        await ledger.get(record.id)

    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("SELECT version FROM ledger_schema").fetchone()[0] == SCHEMA_VERSION
    finally:
        raw.close()

    async with await SqliteLedger.open(path) as reopened:
        assert await reopened.get(record.id) == record
        assert await reopened.unfinished() == [record]
        with pytest.raises(AlreadyReserved):
            await reopened.reserve(**request())


async def test_read_only_opening_creates_nothing_and_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "absent" / "payments.db"
    with pytest.raises(LedgerNotFound) as caught:
        await SqliteLedger.open(missing, read_only=True)
    assert caught.value.code == "ledger_not_found"
    assert not missing.parent.exists()

    path = tmp_path / "payments.db"
    async with await SqliteLedger.open(path) as writer:
        record = await writer.reserve(**request())
        async with await SqliteLedger.open(path, read_only=True) as reader:
            assert await reader.get(record.id) == record
            with pytest.raises(LedgerUnavailable, match="readonly"):
                await reader.transition(record.id, S.VERIFIED)


async def test_unusable_paths_are_clean_ledger_unavailable_errors(tmp_path: Path) -> None:
    directory = tmp_path / "payments.db"
    directory.mkdir()
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database, not even close " * 200)
    for path in (directory, not_a_dir / "payments.db", garbage):
        with pytest.raises(LedgerUnavailable) as caught:
            await SqliteLedger.open(path)
        message = str(caught.value)
        assert caught.value.code == "ledger_unavailable"
        assert str(path) in message
        assert "Traceback" not in message
        assert caught.value.__cause__ is None


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    await (await SqliteLedger.open(path)).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE ledger_schema SET version = 99")
    raw.close()
    with pytest.raises(LedgerUnavailable, match="v99, newer"):
        await SqliteLedger.open(path)


async def test_a_write_lock_held_too_long_is_unavailable_not_a_hang(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    async with await SqliteLedger.open(path, busy_timeout=0.2) as ledger:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
        try:
            with pytest.raises(LedgerUnavailable, match="locked"):
                await asyncio.wait_for(ledger.reserve(**request()), timeout=10)
            assert await ledger.list() == []  # reads still work in WAL
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await ledger.reserve(**request())).state is S.RESERVED


# --- secrets and layering -------------------------------------------------------------------


async def test_repr_and_errors_never_show_the_payload(ledger: Ledger) -> None:
    record = await ledger.reserve(**request())
    assert SIGNATURE[2:10] in record.payload
    with pytest.raises(AlreadyReserved) as caught:
        await ledger.reserve(**request())
    for text in (repr(record), str(record), str(caught.value), repr(caught.value)):
        assert SIGNATURE[2:10] not in text
        assert "payload" not in text
        assert "requirements" not in text


def test_the_ledger_imports_neither_aiohttp_nor_the_server() -> None:
    for name in ("ledger.py", "ledger_sqlite.py", "ledger_postgres.py", "ledger_store.py"):
        tree = ast.parse((ROOT / "paygate" / "x402" / name).read_text())
        modules = {
            alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not {m for m in modules if m.split(".")[0] == "aiohttp"}, name
        assert not {m for m in modules if m.startswith("paygate.server")}, name


@pytest.mark.parametrize("implementation", [SqliteLedger, PostgresLedger])
def test_both_ledgers_take_every_call_through_the_interface(implementation: type) -> None:
    """A store supplies statements only: every call but ``close`` is the interface's own, so
    its argument checks run before the store does any I/O, in both stores alike."""
    calls = [
        name
        for name, value in vars(Ledger).items()
        if inspect.iscoroutinefunction(value) and not name.startswith("_")
    ]
    assert len(calls) == 26  # + take_free, earnings (14); receipts (22); signin_key (21);
    # forget_idempotency_key (25); prune_days (retention); now, abandoned (lease clock)
    for name in calls:
        assert inspect.iscoroutinefunction(getattr(implementation, name)), name
        if name != "close":
            assert getattr(implementation, name) is getattr(Ledger, name), name


# --- metering, budgets, the free quota, earnings (issue 14), on both stores ----------------


async def test_a_metered_payment_records_usage_owed_and_moved(ledger: Ledger) -> None:
    record = await ledger.reserve(**request(), scheme="upto", model="m")
    assert (record.scheme, record.model, record.owed) == ("upto", "m", 1000)
    record = await ledger.transition(record.id, S.VERIFIED)
    meter = Meter(tokens_in=3, tokens_out=5, source="upstream", settle_amount=700)
    record = await ledger.transition(record.id, S.SERVED, meter=meter)
    assert (record.tokens_in, record.tokens_out, record.usage_source) == (3, 5, "upstream")
    assert record.owed == 700
    record = await ledger.transition(record.id, S.SETTLING)
    record = await ledger.transition(record.id, S.SETTLED, settled_amount=700)
    assert record.settled_amount == 700
    assert await ledger.get(record.id) == record
    too_much = await ledger.reserve(**request(2), scheme="upto")
    await ledger.transition(too_much.id, S.VERIFIED)
    with pytest.raises(ValueError, match="exceed"):
        await ledger.transition(
            too_much.id, S.SERVED, meter=Meter(1, 1, "upstream", too_much.amount + 1)
        )


async def test_a_renewal_keeps_a_served_streams_progress_and_nothing_else(ledger: Ledger) -> None:
    """A SERVED stream's renewal carries its progress (what a reconciler settles if it stalls);
    before SERVED, and after its final meter (SETTLING), a renewal changes no usage."""
    record = await ledger.reserve(**request(), scheme="upto", model="m")
    early = await ledger.renew(record.id, record.lease, meter=Meter(1, 1, "running", 100))
    assert (early.tokens_out, early.owed) == (None, 1000)  # reserved: nothing recorded
    first = Meter(tokens_in=3, tokens_out=1, source="running", settle_amount=400)
    record = await ledger.transition(
        record.id, S.SERVED, via=S.VERIFIED, lease=record.lease, meter=first
    )
    later = Meter(tokens_in=3, tokens_out=9, source="running", settle_amount=800)
    record = await ledger.renew(record.id, record.lease, meter=later)
    assert (record.state, record.tokens_out, record.usage_source) == (S.SERVED, 9, "running")
    assert record.owed == 800
    assert await ledger.get(record.id) == record
    with pytest.raises(ValueError, match="exceed"):
        await ledger.renew(record.id, record.lease, meter=Meter(3, 99, "running", 1001))
    final = Meter(tokens_in=3, tokens_out=12, source="upstream", settle_amount=900)
    record = await ledger.transition(record.id, S.SETTLING, lease=record.lease, meter=final)
    record = await ledger.renew(record.id, record.lease, meter=later)
    assert (record.tokens_out, record.owed) == (12, 900)  # the final meter stays


async def test_a_budget_holds_under_concurrent_reservations(ledger: Ledger) -> None:
    budget = Budget(limit=3500, since=0.0)
    results = await asyncio.gather(
        *(ledger.reserve(**request(n), budget=budget) for n in range(1, 11)),
        return_exceptions=True,
    )
    won = [r for r in results if isinstance(r, PaymentRecord)]
    assert len(won) == 3  # 1000 each
    assert all(isinstance(r, BudgetExceeded) for r in results if r not in won)
    await ledger.transition(won[0].id, S.RELEASED)  # released: counts nothing any more
    assert (await ledger.reserve(**request(20), budget=budget)).state is S.RESERVED


async def test_the_free_quota_counts_per_day_and_uses_each_sign_in_once(ledger: Ledger) -> None:
    taken = [
        await ledger.take_free(payer=PAYER, nonce=f"n{i:08d}", day="2026-12-01", limit=2)
        for i in range(3)
    ]
    assert taken == [1, 0, None]
    assert await ledger.take_free(payer=PAYER, nonce="other001", day="2026-12-02", limit=2) == 1
    with pytest.raises(SignInReused):
        await ledger.take_free(payer=PAYER, nonce="n00000000", day="2026-12-03", limit=2)


async def test_earnings_group_settled_payments(ledger: Ledger) -> None:
    for n, model in ((1, "a"), (2, "a"), (3, "b")):
        record = await ledger.reserve(**request(n), scheme="upto", model=model)
        for step in (S.VERIFIED,):
            record = await ledger.transition(record.id, step)
        record = await ledger.transition(
            record.id, S.SERVED, meter=Meter(1, 2, "upstream", 100 * n)
        )
        record = await ledger.transition(record.id, S.SETTLING)
        await ledger.transition(record.id, S.SETTLED, settled_amount=100 * n)
    await ledger.reserve(**request(9))  # not settled: not earnings
    groups = await ledger.earnings(since=0.0, by="model")
    assert [(g.key, g.payments, g.tokens_out, g.settled) for g in groups] == [
        ("a", 2, 4, 300),
        ("b", 1, 2, 300),
    ]
    (day,) = await ledger.earnings(since=0.0, by="day")
    assert (day.payments, day.settled) == (3, 600)
    assert await ledger.earnings(since=4_000_000_000.0, by="payer") == []


async def test_receipts_are_kept_once_per_kind_with_the_usage_they_state(ledger: Ledger) -> None:
    from paygate.x402.ledger import ReceiptUsage

    record = await ledger.reserve(**request(1))
    other = await ledger.reserve(**request(2))
    usage = ReceiptUsage(tokens_in=12, tokens_out=34, source="upstream")
    await ledger.add_receipt(record.id, "reply", "first.token", usage=usage)
    # The first kept stays (its bytes never change), and so does the usage it recorded.
    await ledger.add_receipt(record.id, "reply", "second.token", usage=ReceiptUsage(1, 1, "x"))
    await ledger.add_receipt(record.id, "settlement", "settled.token")
    await ledger.add_receipt(other.id, "reply", "other.token")
    kept = await ledger.receipts(record.id)
    assert [(k.kind, k.token) for k in kept] == [
        ("reply", "first.token"),
        ("settlement", "settled.token"),
    ]
    stored = await ledger.get(record.id)
    assert stored is not None
    assert (stored.tokens_in, stored.tokens_out, stored.usage_source) == (12, 34, "upstream")
    assert stored.scheme == "exact"  # usage recorded whatever the scheme
    assert [r.id for r in await ledger.by_nonce(nonce(1).upper().replace("0X", "0x"))] == [
        record.id
    ]
    assert await ledger.by_nonce(nonce(3)) == []
    newest = await ledger.list_receipts(limit=2)
    assert len(newest) == 2
    assert newest[0].token == "other.token"
    with pytest.raises(ValueError, match="receipt kind"):
        await ledger.add_receipt(record.id, "other", "x.y")
    with pytest.raises(ValueError, match="receipt token"):
        await ledger.add_receipt(record.id, "reply", "x" * 10_000)
    with pytest.raises(PaymentNotFound):
        await ledger.add_receipt("f" * 32, "reply", "x.y")


async def test_a_receipt_from_a_replica_that_lost_the_lease_records_no_usage(
    ledger: Ledger,
) -> None:
    from paygate.x402.ledger import ReceiptUsage

    record = await ledger.reserve(**request(1))
    await ledger.add_receipt(
        record.id,
        "reply",
        "late.token",
        usage=ReceiptUsage(5, 6, "upstream"),
        lease=record.lease + 1,
    )
    stored = await ledger.get(record.id)
    assert stored == record  # the payment is untouched: its epoch moved on
    assert [k.token for k in await ledger.receipts(record.id)] == ["late.token"]


async def test_a_move_keeps_the_reply_receipt_in_its_own_transaction(ledger: Ledger) -> None:
    from paygate.x402.ledger import EventAction, LeaseLost, ReceiptUsage

    record = await ledger.reserve(**request(1))
    usage = ReceiptUsage(7, 8, "upstream")
    # Fenced: a stale epoch moves nothing and keeps nothing.
    with pytest.raises(LeaseLost):
        await ledger.transition(
            record.id,
            S.SERVED,
            via=S.VERIFIED,
            lease=record.lease + 1,
            reply_receipt="stale.token",
            receipt_usage=usage,
        )
    assert await ledger.receipts(record.id) == []
    assert await ledger.get(record.id) == record
    with pytest.raises(ValueError, match="receipt token"):
        await ledger.transition(
            record.id, S.SERVED, via=S.VERIFIED, lease=record.lease, reply_receipt="x" * 10_000
        )
    served = await ledger.transition(
        record.id,
        S.SERVED,
        via=S.VERIFIED,
        lease=record.lease,
        let_go=True,
        reply_receipt="reply.token",
        receipt_usage=usage,
    )
    assert (served.state, served.served, served.owner, served.lease_until) == (
        S.SERVED,
        True,
        None,
        None,
    )
    assert (served.tokens_in, served.tokens_out, served.usage_source) == (7, 8, "upstream")
    assert await ledger.get(record.id) == served
    assert [(k.kind, k.token) for k in await ledger.receipts(record.id)] == [
        ("reply", "reply.token")
    ]
    assert [(e.action, e.state, e.lease) for e in await ledger.history(record.id)] == [
        (EventAction.RESERVED, S.RESERVED, 1),
        (EventAction.MOVED, S.VERIFIED, 1),
        (EventAction.MOVED, S.SERVED, 1),
    ]
    # A metered payment's usage is its meter's, not the receipt's; a receipt kept earlier stays.
    metered = await ledger.reserve(**request(2))
    await ledger.add_receipt(metered.id, "reply", "earlier.token")
    meter = Meter(tokens_in=1, tokens_out=2, source="upstream", settle_amount=500)
    moved = await ledger.transition(
        metered.id,
        S.SERVED,
        via=S.VERIFIED,
        lease=metered.lease,
        meter=meter,
        reply_receipt="later.token",
        receipt_usage=usage,
    )
    assert (moved.tokens_in, moved.tokens_out, moved.settle_amount) == (1, 2, 500)
    assert [k.token for k in await ledger.receipts(metered.id)] == ["earlier.token"]


async def test_a_move_through_a_state_is_both_moves_in_one(ledger: Ledger) -> None:
    from paygate.x402.ledger import EventAction

    record = await in_state(ledger, S.VERIFIED)
    settled = await ledger.transition(
        record.id,
        S.SETTLED,
        via=S.SETTLING,
        lease=record.lease,
        transaction=tx(3),
        settled_amount=900,
    )
    # The move into SETTLING counted its attempt; the hash and the amount moved are the last
    # move's; the lease ended with the payment.
    assert (settled.state, settled.attempts, settled.transaction, settled.settled_amount) == (
        S.SETTLED,
        1,
        tx(3),
        900,
    )
    assert (settled.owner, settled.lease_until) == (None, None)
    assert await ledger.get(record.id) == settled
    history = await ledger.history(record.id)
    assert [(e.action, e.state, e.transaction) for e in history[-2:]] == [
        (EventAction.MOVED, S.SETTLING, None),
        (EventAction.MOVED, S.SETTLED, tx(3)),
    ]
    # Through two states: every move checked and in the history, the attempt counted once.
    fresh = await ledger.reserve(**request(3))
    settling = await ledger.transition(
        fresh.id, S.SETTLING, via=(S.VERIFIED, S.SERVED), lease=fresh.lease
    )
    assert (settling.state, settling.served, settling.attempts) == (S.SETTLING, True, 1)
    assert await ledger.get(fresh.id) == settling
    assert [e.state for e in await ledger.history(fresh.id)] == [
        S.RESERVED,
        S.VERIFIED,
        S.SERVED,
        S.SETTLING,
    ]
    verified = await in_state(ledger, S.VERIFIED, 4)
    with pytest.raises(LedgerConflict, match="served -> verified"):
        await ledger.transition(verified.id, S.SETTLED, via=(S.SERVED, S.VERIFIED))
    assert await ledger.get(verified.id) == verified
    # The second move is checked on the state the first left: SETTLING -> VERIFIED is not.
    other = await in_state(ledger, S.VERIFIED, 2)
    with pytest.raises(LedgerConflict):
        await ledger.transition(other.id, S.VERIFIED, via=S.SETTLING, lease=other.lease)
    assert await ledger.get(other.id) == other


async def _table_lines(ledger: Ledger, payment_id: str) -> list[tuple[str, str]]:
    """The payment's lines in payment_events itself, in order."""
    _, rows = await ledger.scheme_sql(  # type: ignore[attr-defined]
        "SELECT action, state FROM payment_events WHERE payment_id = ? ORDER BY at, seq",
        (payment_id,),
    )
    return [(str(a), str(s)) for a, s in rows]


async def test_a_paid_request_s_history_is_kept_in_its_row_until_an_unusual_line(
    ledger_store: Opener,
) -> None:
    from paygate.x402.ledger import EventAction as A

    clock = Clock()
    ledger = await ledger_store(clock=clock, replica="one")
    # The ordinary course (reserved, VERIFIED, SERVED): the same history, no payment_events row.
    record = await ledger.reserve(**request(1))
    clock.now += 1
    served = await ledger.transition(
        record.id, S.SERVED, via=S.VERIFIED, lease=record.lease, let_go=True
    )
    ordinary = [
        (A.RESERVED, S.RESERVED, 1, clock.now - 1),
        (A.MOVED, S.VERIFIED, 1, clock.now),
        (A.MOVED, S.SERVED, 1, clock.now),
    ]
    history = await ledger.history(record.id)
    assert [(e.action, e.state, e.lease, e.at) for e in history] == ordinary
    assert {(e.payment_id, e.replica, e.transaction, e.error, e.detail) for e in history} == {
        (record.id, "one", None, None, None)
    }
    assert await _table_lines(ledger, record.id) == []
    # Any other line (a claim, then settlement) moves the row's lines to payment_events first,
    # in order: the history reads the same, and payment_events holds all of it.
    clock.now += 1
    (claimed,) = await ledger.claim_unfinished(min_age=0)
    await ledger.transition(claimed.id, S.SETTLING, lease=claimed.lease)
    clock.now += 1
    await ledger.transition(claimed.id, S.SETTLED, lease=claimed.lease, transaction=tx(1))
    after = await ledger.history(record.id)
    assert after[:3] == history
    assert [(e.action, e.state, e.detail) for e in after[3:]] == [
        (A.CLAIMED, S.SERVED, "nobody"),
        (A.MOVED, S.SETTLING, None),
        (A.MOVED, S.SETTLED, None),
    ]
    assert await _table_lines(ledger, record.id) == [(e.action.value, e.state.value) for e in after]
    assert (await ledger.get(record.id)) == (await ledger.get(served.id))
    # A move with a line of its own kind (SETTLING with the ordinary ones) goes there whole.
    settle = await ledger.reserve(**request(2))
    await ledger.transition(settle.id, S.SETTLING, via=(S.VERIFIED, S.SERVED), lease=settle.lease)
    assert await _table_lines(ledger, settle.id) == [
        ("reserved", "reserved"),
        ("moved", "verified"),
        ("moved", "served"),
        ("moved", "settling"),
    ]
    # A release (the reservation's owner gone), then the authorization reserved again.
    gone = await ledger.reserve(**request(3))
    await ledger.transition(gone.id, S.VERIFIED, lease=gone.lease)
    assert [r.id for r in await ledger.release_abandoned(own=True)] == [gone.id]
    again = await ledger.reserve(**request(3))
    await ledger.transition(again.id, S.VERIFIED, lease=again.lease)
    lines = [(e.action, e.state, e.lease) for e in await ledger.history(gone.id)]
    assert lines == [
        (A.RESERVED, S.RESERVED, 1),
        (A.MOVED, S.VERIFIED, 1),
        (A.RELEASED, S.RELEASED, 2),
        (A.RESERVED, S.RESERVED, 3),
        (A.MOVED, S.VERIFIED, 3),
    ]
    assert await _table_lines(ledger, gone.id) == [(a.value, s.value) for a, s, _ in lines]
    # Letting a lease go and marking served (off the ordinary course) move it too.
    let_go = await ledger.reserve(**request(4))
    await ledger.let_go(let_go.id, let_go.lease)
    marked = await ledger.reserve(**request(5))
    await ledger.mark_served(marked.id)
    assert await _table_lines(ledger, let_go.id) == [
        ("reserved", "reserved"),
        ("let_go", "reserved"),
    ]
    assert await _table_lines(ledger, marked.id) == [
        ("reserved", "reserved"),
        ("served", "reserved"),
    ]


async def test_a_settlement_made_in_the_ledger_keeps_its_history_in_the_row(
    ledger_store: Opener,
) -> None:
    """A batch-settlement voucher's charge is SERVED, SETTLING and SETTLED in one transaction
    (nothing moves outside the ledger between them): its scheme's ordinary course, kept in the
    row like reserved/VERIFIED/SERVED — no payment_events row per voucher request. A settlement
    that names a transaction, or SETTLING on its own, still moves it all to payment_events
    (the console's settle latencies read SETTLING and SETTLED lines there)."""
    from paygate.x402.ledger import EventAction as A

    clock = Clock()
    ledger = await ledger_store(clock=clock, replica="one")
    record = await ledger.reserve(**request(1))
    clock.now += 1
    via = (S.VERIFIED, S.SERVED, S.SETTLING)
    await ledger.transition(record.id, S.SETTLED, via=via, lease=record.lease, settled_amount=7)
    history = await ledger.history(record.id)
    assert [(e.action, e.state, e.lease, e.at) for e in history] == [
        (A.RESERVED, S.RESERVED, 1, clock.now - 1),
        (A.MOVED, S.VERIFIED, 1, clock.now),
        (A.MOVED, S.SERVED, 1, clock.now),
        (A.MOVED, S.SETTLING, 1, clock.now),
        (A.MOVED, S.SETTLED, 1, clock.now),
    ]
    assert {(e.transaction, e.error, e.detail) for e in history} == {(None, None, None)}
    assert await _table_lines(ledger, record.id) == []
    # Settled with a transaction (money moved outside the ledger): payment_events, whole.
    chain = await ledger.reserve(**request(2))
    await ledger.transition(
        chain.id, S.SETTLED, via=via, lease=chain.lease, transaction=tx(2), settled_amount=7
    )
    assert await _table_lines(ledger, chain.id) == [
        ("reserved", "reserved"),
        ("moved", "verified"),
        ("moved", "served"),
        ("moved", "settling"),
        ("moved", "settled"),
    ]
    assert (await ledger.history(chain.id))[-1].transaction == tx(2)
    # SETTLED reached from SETTLING in a later change: the SETTLING change moved it already.
    later = await ledger.reserve(**request(3))
    await ledger.transition(later.id, S.SETTLING, via=via[:2], lease=later.lease)
    await ledger.transition(later.id, S.SETTLED, lease=later.lease, settled_amount=7)
    assert [s for _, s in await _table_lines(ledger, later.id)][-2:] == ["settling", "settled"]


# --- budgets by admission/settlement time, the sign-in key (issue 21), on both stores -------

DAY = 86_400.0


async def test_a_budget_counts_released_authorizations_served_again_today(
    ledger_store: Opener,
) -> None:
    # Yesterday, 23:50: four authorizations are reserved and released (the upstream failed).
    now = [20 * DAY - 600.0]
    ledger = await ledger_store(clock=lambda: now[0])
    for n in range(1, 5):
        record = await ledger.reserve(**request(n), budget=Budget(limit=10_000, since=19 * DAY))
        await ledger.transition(record.id, S.RELEASED)
    # The clock crosses midnight; the same authorizations come back today.
    now[0] = 20 * DAY + 60.0
    today = Budget(limit=3500, since=20 * DAY)
    served = []
    for n in range(1, 5):
        with contextlib.suppress(BudgetExceeded):
            served.append(await ledger.reserve(**request(n), budget=today))
    # Three fit today's budget of 3500 (1000 each): the fourth is refused, however old its
    # record (before: all four passed, counted on the day they were created).
    assert len(served) == 3


async def test_a_payment_settled_today_counts_today(ledger_store: Opener) -> None:
    now = [20 * DAY - 60.0]
    ledger = await ledger_store(clock=lambda: now[0])
    record = await ledger.reserve(**request(1))
    for state in (S.VERIFIED, S.SERVED, S.SETTLING):
        record = await ledger.transition(record.id, state)
    now[0] = 20 * DAY + 60.0
    await ledger.transition(record.id, S.SETTLED, settled_amount=1000)
    with pytest.raises(BudgetExceeded):
        await ledger.reserve(**request(2), budget=Budget(limit=1500, since=20 * DAY))


async def test_the_signin_key_is_made_once_and_shared(ledger_store: Opener) -> None:
    first, second = await ledger_store(), await ledger_store()
    key = await first.signin_key()
    assert len(key) == 32
    assert await second.signin_key() == key
