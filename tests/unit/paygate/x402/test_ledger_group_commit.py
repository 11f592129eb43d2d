"""Group commit in the SQLite ledger (paygate.x402.ledger_commit): concurrent calls share one
COMMIT (one fsync), each caller is answered only after its own COMMIT, a failing call does not
fail the others, and a process killed with a group in flight loses nothing it acknowledged."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from paygate.x402.ledger import (
    AlreadyReserved,
    IdempotencyKeyReused,
    LedgerConflict,
    LedgerUnavailable,
    PaymentNotFound,
    PaymentState,
)
from paygate.x402.ledger_sqlite import SqliteLedger
from tests.fixtures.ledger_support import hold_write_lock, let_go

ROOT = Path(__file__).resolve().parents[4]
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"


def request(n: int, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "network": "eip155:84532",
        "asset": USDC,
        "payer": PAYER,
        "nonce": f"0x{n:064x}",
        "pay_to": PAY_TO,
        "amount": 1000,
        "x402_version": 2,
        "route": "chat.completions",
        "payload": '{"signature":"0x' + "5a" * 65 + '"}',
        "requirements": "{}",
        "idempotency_key": None,
    }
    values.update(overrides)
    return values


class Commits:
    """The ledger's after-commit hook: counts COMMITs (each one fsync) and the calls in each;
    holds the first COMMIT's callers until ``release`` so that the next calls queue up."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.gate = threading.Event()

    def __call__(self, calls: int) -> None:
        self.sizes.append(calls)
        if len(self.sizes) == 1:
            self.gate.wait(timeout=30)


def durable(path: Path, payment_id: str) -> bool:
    """Seen by another connection: committed (the WAL with synchronous=FULL is on disk)."""
    db = sqlite3.connect(path)
    try:
        return (
            db.execute("SELECT 1 FROM payments WHERE id = ?", (payment_id,)).fetchone() is not None
        )
    finally:
        db.close()


async def open_counted(path: Path) -> tuple[SqliteLedger, Commits]:
    ledger = await SqliteLedger.open(path)
    commits = Commits()
    ledger.group_commit.after_commit = commits
    return ledger, commits


async def test_concurrent_calls_share_commits_and_each_returns_after_its_own(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    ledger, commits = await open_counted(path)
    try:
        tasks = [asyncio.create_task(ledger.reserve(**request(n))) for n in range(40)]
        await asyncio.sleep(0.2)  # every call submitted; the first COMMIT is held at the gate
        assert not any(t.done() for t in tasks), "a caller was answered before its COMMIT"
        commits.gate.set()
        records = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        # 40 transactions, far fewer fsyncs: the ones queued behind the first share a COMMIT.
        assert sum(commits.sizes) == 40
        assert len(commits.sizes) <= 3
        assert max(commits.sizes) >= 20
        for record in records:
            assert record.state is PaymentState.RESERVED
            assert durable(path, record.id)
    finally:
        commits.gate.set()
        await ledger.close()


async def test_each_caller_sees_its_row_committed_the_moment_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger, commits = await open_counted(path)
    commits.gate.set()
    seen: list[bool] = []

    async def one(n: int) -> None:
        record = await ledger.reserve(**request(n))
        seen.append(durable(path, record.id))  # before anyone else's COMMIT could help it

    try:
        await asyncio.wait_for(asyncio.gather(*(one(n) for n in range(30))), 30)
    finally:
        await ledger.close()
    assert seen == [True] * 30
    assert sum(commits.sizes) == 30


async def test_a_failing_call_in_a_group_does_not_fail_the_others(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)
    sizes: list[int] = []
    hold = threading.Event()

    def held(calls: int) -> None:
        sizes.append(calls)
        if len(sizes) == 1:
            hold.wait(timeout=30)

    try:
        first = await ledger.reserve(**request(1, idempotency_key="key-of-payment-0001"))
        ledger.group_commit.after_commit = held
        opener = asyncio.create_task(ledger.reserve(**request(100)))
        await asyncio.sleep(0.1)  # its COMMIT is held: what follows queues into one group
        calls = [
            ledger.reserve(**request(2)),
            ledger.reserve(**request(1)),  # a replay: AlreadyReserved
            ledger.reserve(
                **request(3, idempotency_key="key-of-payment-0001")
            ),  # another payment's key
            ledger.transition("no-such-payment", PaymentState.VERIFIED),  # not found
            ledger.transition(first.id, PaymentState.SETTLED),  # not allowed from RESERVED
            ledger.reserve(**request(4)),
        ]
        tasks = [asyncio.create_task(c) for c in calls]
        await asyncio.sleep(0.1)
        hold.set()
        await opener
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
    finally:
        hold.set()
        await ledger.close()
    good, replay, key, unknown, forbidden, also_good = outcomes
    assert isinstance(replay, AlreadyReserved)
    assert isinstance(key, IdempotencyKeyReused)
    assert isinstance(unknown, PaymentNotFound)
    assert isinstance(forbidden, LedgerConflict)
    assert sizes[1] == len(calls)  # they were one group: one COMMIT for all six
    for record in (good, also_good):
        assert not isinstance(record, BaseException)
        assert durable(path, record.id)
    async with await SqliteLedger.open(path) as again:
        assert (await again.get(first.id)).state is PaymentState.RESERVED  # type: ignore[union-attr]
        assert (
            await again.find(network="eip155:84532", asset=USDC, payer=PAYER, nonce=f"0x{3:064x}")
            is None
        )  # the refused reservation left nothing behind


async def test_a_lost_commit_fails_every_call_of_its_group(tmp_path: Path) -> None:
    """SQLite abandons the whole transaction under a later call (an I/O error, a full disk;
    played here by a ROLLBACK on the connection): the earlier calls of the group are told,
    never answered as if durable, and the calls after it start a new transaction."""
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)
    conn = ledger._conn  # the test plays SQLite rolling back under a call

    def roll_back() -> None:
        conn.execute("ROLLBACK")

    try:
        hold = threading.Event()
        ledger.group_commit.after_commit = lambda calls: hold.wait(timeout=30)
        opener = asyncio.create_task(ledger.reserve(**request(100)))
        await asyncio.sleep(0.1)
        first = asyncio.create_task(ledger.reserve(**request(1)))
        # in the same group as its neighbours: on the event loop's path, like theirs
        vanish = asyncio.create_task(ledger._submit(False, True, roll_back))
        later = asyncio.create_task(ledger.reserve(**request(2)))
        await asyncio.sleep(0.1)
        hold.set()
        await opener
        outcomes = await asyncio.wait_for(
            asyncio.gather(first, vanish, later, return_exceptions=True), 30
        )
    finally:
        hold.set()
        await ledger.close()
    assert isinstance(outcomes[0], LedgerUnavailable)  # its row went with the transaction
    assert isinstance(outcomes[1], LedgerUnavailable)  # the call it happened under is told too
    assert not isinstance(outcomes[2], BaseException)  # after the loss: a new transaction
    async with await SqliteLedger.open(path) as again:
        assert (
            await again.find(network="eip155:84532", asset=USDC, payer=PAYER, nonce=f"0x{1:064x}")
            is None
        )
        assert await again.get(outcomes[2].id) is not None  # type: ignore[union-attr]


CHILD = f"""
import asyncio, sys
from paygate.x402.ledger_sqlite import SqliteLedger

async def main(path):
    ledger = await SqliteLedger.open(path)
    n = 0
    async def one(k):
        record = await ledger.reserve(
            network="eip155:84532", asset="{USDC}", payer="{PAYER}", nonce="0x%064x" % k,
            pay_to="{PAY_TO}", amount=1000, x402_version=2, route="chat.completions",
            payload='{{"signature":"0x{"5a" * 65}"}}', requirements="{{}}",
            idempotency_key=None,
        )
        print(record.id, flush=True)  # acknowledged: it must survive anything from here on
    while True:  # 16 at a time, as 16 connections would: groups in flight all the time
        await asyncio.gather(*(one(n + i) for i in range(16)))
        n += 16

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("after", [40, 400])
def test_a_kill_with_groups_in_flight_loses_nothing_acknowledged(
    tmp_path: Path, after: int
) -> None:
    path = tmp_path / "ledger.db"
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True, env=env
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < after:
            ready, _, _ = select.select([child.stdout], [], [], 60)
            assert ready, "the child stopped acknowledging"
            line = child.stdout.readline()
            assert line, "the child ended"
            acknowledged.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)  # mid-group: no close, no checkpoint
        child.wait(timeout=30)
        acknowledged += [line.strip() for line in child.stdout.read().splitlines() if line]
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
    db = sqlite3.connect(path)
    try:
        stored = {row[0] for row in db.execute("SELECT id FROM payments")}
    finally:
        db.close()
    assert set(acknowledged) <= stored


# --- the event loop's path: statements on the loop, the COMMIT on the worker -----------------


async def test_a_write_lock_held_by_another_process_never_stalls_the_event_loop(
    tmp_path: Path,
) -> None:
    """The loop tries the lock without waiting; the worker waits for it: meanwhile the loop
    runs everything else, and the call completes, durable, once the lock is free."""
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)
    first = await ledger.reserve(**request(1))
    holder = hold_write_lock(path)
    try:
        pending = asyncio.create_task(ledger.reserve(**request(2)))
        ticks = 0
        for _ in range(20):  # the loop keeps turning while the reserve waits for the lock
            await asyncio.sleep(0.005)
            ticks += 1
        assert ticks == 20
        assert not pending.done()
        let_go(holder)
        record = await asyncio.wait_for(pending, 30)
    finally:
        let_go(holder)
        await ledger.close()
    assert record.state is PaymentState.RESERVED
    assert durable(path, record.id)
    assert durable(path, first.id)


async def test_a_write_lock_held_past_the_busy_timeout_is_a_clear_error_then_recovers(
    tmp_path: Path,
) -> None:
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path, busy_timeout=0.3)
    holder = hold_write_lock(path)
    try:
        with pytest.raises(LedgerUnavailable):
            await asyncio.wait_for(ledger.reserve(**request(1)), 30)
        let_go(holder)
        # Nothing of the refused call was kept; the same reservation goes through now.
        record = await asyncio.wait_for(ledger.reserve(**request(1)), 30)
        assert (await ledger.history(record.id))[0].action.value == "reserved"
        assert len(await ledger.history(record.id)) == 1
    finally:
        let_go(holder)
        await ledger.close()


async def test_calls_arriving_during_a_commit_run_in_order_as_the_next_group(
    tmp_path: Path,
) -> None:
    """While the worker commits, the loop queues; then one group runs them all in the order
    they came (a reservation and the moves of it that follow it in the same group)."""
    path = tmp_path / "ledger.db"
    ledger, commits = await open_counted(path)
    try:
        opener = asyncio.create_task(ledger.reserve(**request(100)))
        await asyncio.sleep(0.1)  # its COMMIT is held at the gate
        first = asyncio.create_task(ledger.reserve(**request(1)))
        second = asyncio.create_task(ledger.reserve(**request(1)))  # the same key: a replay
        listed = asyncio.create_task(ledger.list(limit=10))  # a scan: the worker's, in order
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in (first, second, listed))
        commits.gate.set()
        await opener
        outcomes = await asyncio.wait_for(
            asyncio.gather(first, second, listed, return_exceptions=True), 30
        )
    finally:
        commits.gate.set()
        await ledger.close()
    record, replay, rows = outcomes
    assert not isinstance(record, BaseException)
    assert isinstance(replay, AlreadyReserved)  # ran after the first, as submitted
    assert {r.id for r in rows} >= {record.id}  # type: ignore[union-attr]
    assert commits.sizes[1] == 2  # the two reservations: one COMMIT


async def test_calls_from_a_second_event_loop_are_serialised_with_the_first_s(
    tmp_path: Path,
) -> None:
    """The loop that first used the ledger runs its statements itself; another loop's calls
    (a thread of its own) go to the worker, which takes the connection only between the first
    loop's groups: both finish, every reservation once, nothing interleaved into a wrong
    transaction."""
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)

    async def many(first: int) -> list[str]:
        records = await asyncio.gather(*(ledger.reserve(**request(first + n)) for n in range(40)))
        return [r.id for r in records]

    try:
        other = asyncio.create_task(asyncio.to_thread(asyncio.run, many(1000)))
        here = await asyncio.wait_for(many(0), 60)
        there = await asyncio.wait_for(other, 60)
    finally:
        await ledger.close()
    assert len(set(here) | set(there)) == 80
    for payment_id in here + there:
        assert durable(path, payment_id)


async def _one_group_behind(ledger: SqliteLedger, hold: threading.Event) -> None:
    """Holds the worker in a first group's COMMIT (``hold``) so that the calls that follow run
    on the event loop as the next group."""
    ledger.group_commit.after_commit = lambda calls: hold.wait(timeout=30)
    opener = asyncio.create_task(ledger.reserve(**request(100)))
    await asyncio.sleep(0.1)
    assert not opener.done()  # answered only after its COMMIT, which is held


async def test_a_failed_commit_fails_every_call_of_its_group(tmp_path: Path) -> None:
    """The COMMIT of a group of several requests fails (played by a ROLLBACK on the worker
    just before it): every caller of the group gets an error, none a record, none of their
    rows is there, and the next call commits as usual."""
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)
    conn = ledger._conn
    sizes: list[int] = []

    def fail_the_group(calls: int) -> None:
        sizes.append(calls)
        if calls == 3:
            conn.execute("ROLLBACK")  # the COMMIT after it fails: no transaction is active

    hold = threading.Event()
    try:
        await _one_group_behind(ledger, hold)
        ledger.group_commit.before_commit = fail_the_group
        group = [asyncio.create_task(ledger.reserve(**request(n))) for n in (1, 2, 3)]
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in group)  # none answered before its COMMIT
        hold.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*group, return_exceptions=True), 30)
        after = await asyncio.wait_for(ledger.reserve(**request(4)), 30)
    finally:
        hold.set()
        await ledger.close()
    assert 3 in sizes  # the three shared one COMMIT
    assert all(isinstance(outcome, LedgerUnavailable) for outcome in outcomes), outcomes
    async with await SqliteLedger.open(path) as again:
        for n in (1, 2, 3):
            assert (
                await again.find(
                    network="eip155:84532", asset=USDC, payer=PAYER, nonce=f"0x{n:064x}"
                )
                is None
            )
        assert await again.get(after.id) is not None


async def test_a_caller_cancelled_in_the_middle_of_a_group_still_gets_its_change_made(
    tmp_path: Path,
) -> None:
    """Callers of one group cancelled while they wait (one whose call is queued behind a
    COMMIT, one whose statements already ran and waits for its group's COMMIT): their changes
    are made and committed as submitted, and the rest of the group is answered."""
    path = tmp_path / "ledger.db"
    ledger = await SqliteLedger.open(path)
    hold, in_commit = threading.Event(), threading.Event()
    second = threading.Event()

    def hold_second_group(calls: int) -> None:
        if calls == 3:
            in_commit.set()
            second.wait(timeout=30)

    try:
        await _one_group_behind(ledger, hold)
        group = [asyncio.create_task(ledger.reserve(**request(n))) for n in (1, 2, 3)]
        await asyncio.sleep(0.05)
        group[0].cancel()  # queued: its call has not run yet
        ledger.group_commit.before_commit = hold_second_group
        hold.set()
        async with asyncio.timeout(30):
            while not in_commit.is_set():
                await asyncio.sleep(0.01)
        group[1].cancel()  # its statements ran: it waits for the group's COMMIT
        second.set()
        outcomes = await asyncio.wait_for(asyncio.gather(*group, return_exceptions=True), 30)
    finally:
        hold.set()
        second.set()
        await ledger.close()
    assert isinstance(outcomes[0], asyncio.CancelledError)
    assert isinstance(outcomes[1], asyncio.CancelledError)
    assert not isinstance(outcomes[2], BaseException)
    db = sqlite3.connect(path)  # another connection: what is committed
    try:
        for n in (1, 2, 3):
            found = db.execute("SELECT state FROM payments WHERE nonce = ?", (f"0x{n:064x}",))
            assert found.fetchone() == (PaymentState.RESERVED.value,), n
    finally:
        db.close()
