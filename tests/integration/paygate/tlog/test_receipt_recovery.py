"""Receipts the ledger kept but the transparency log was never given (paygate.tlog.recovery).

- a real crash: a chain-mode batch-settlement gateway (a real anvil) SIGKILLed right after the
  voucher charge's transaction kept the reply receipt and before the log was given it; the
  gateway restarted on the same ledger records it, a receipts entry covers it (its inclusion
  proof verifies, ``paygate receipts audit`` proves it) and that entry's total counts the charge;
- on both stores (SQLite file, PostgreSQL 15): each missing receipt recorded once, whatever
  the log already had; a second pass, a second process's first pass and two recoveries at once
  record nothing twice; a pass reads at most its batch; a receipt kept less than ``grace`` ago
  is left to the process recording it; an unreadable kept token is passed over;
- the residual race (a process frozen past the grace records a receipt recovery recorded): no
  period counts its leaf twice; a restart reaches back grace + interval whatever the window;
  ties of kept time across batches; a token with an absurd time does not stall the scan; a pass
  yields the event loop; the operator's log lines; close() ends a stuck pass;
- the metrics an operator alerts on: a real gateway whose ledger holds a receipt its log lacks
  shows it recovered on ``/metrics`` (recorded count, scan time, lag 0, the checked time);
  a failing pass counts as a failure and its lag grows; a backlog shows as lag.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from enclave import SoftwareKey, receipts
from enclave.tlog import entries, merkle
from paygate.server.metrics import Metrics
from paygate.tlog.errors import LogStoreError
from paygate.tlog.open_store import open_log_store
from paygate.tlog.recovery import Pass, RecoveryConfig
from paygate.tlog.service import LogConfig, TransparencyLog, log_identity, receipt_facts
from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_store import LedgerLocation, open_ledger, parse_ledger_url
from tests.fixtures.batch_settlement_support import chain_batch
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.ledger_support import request
from tests.fixtures.payment_support import PRICE_ATOMIC, records
from tests.fixtures.tlog_support import ORIGIN, gateway_settings

ROOT = Path(__file__).resolve().parents[4]
DEPOSIT = 10 * PRICE_ATOMIC


# --- a real crash --------------------------------------------------------------------------


def _tlog_leaves(ledger: Path) -> list[bytes]:
    with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
        return [bytes(row[0]) for row in db.execute("SELECT leaf FROM tlog_receipts")]


def _log_entries(ledger: Path) -> list[dict[str, Any]]:
    with contextlib.closing(sqlite3.connect(ledger, timeout=10)) as db:
        rows = db.execute("SELECT data FROM tlog_entries ORDER BY idx").fetchall()
    return [entries.parse(bytes(row[0])) for row in rows]


async def _crashed_child(orders: dict[str, Any]) -> tuple[int | None, list[dict[str, Any]], str]:
    env = {"PYTHONPATH": f"{ROOT}:{ROOT / 'devtools'}"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fixtures.tlog_crash_child",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, **env},
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(json.dumps(orders).encode()), 180)
    except TimeoutError:
        process.kill()  # by its own PID
        await process.wait()
        raise
    lines = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return process.returncode, lines, err.decode()[-3000:]


def _audit(url: str, token: str, vkey: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "receipts", "audit", url, token,
         "--log-key", vkey],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip


async def test_a_receipt_kept_with_its_charge_before_a_kill_is_logged_after_the_restart(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    ledger = tmp_path / "payments.db"
    # A stable replica name, as a restarted service keeps: the restart takes the recovery turn
    # its previous run held back at once (another name waits for that turn's lease to run out).
    logged = {
        "transparency_log": True,
        "log_origin": ORIGIN,
        "log_receipt_period": 3600,
        "replica_id": "gateway-1",
    }
    orders = {
        "rpc_url": anvil.rpc_url,
        "gas_key": gas_key.key,
        "payer_key": payer.key.hex(),
        "seller": seller,
        "ledger": str(ledger),
        "deposit": DEPOSIT,
        "settings": logged,
    }
    code, lines, err = await _crashed_child(orders)
    assert code == -9, err  # SIGKILL: nothing closed, nothing flushed by the gateway
    assert lines[0] == {"opened": True}, err
    token = lines[-1]["dying"]
    # The state the crash left: the charge and its receipt in the ledger, not in the log.
    found = await records(ledger)
    (charged,) = [r for r in found if r.nonce == receipts.unverified_claims(token)["payment"]["id"]]
    assert (charged.state, charged.settled_amount) == (PaymentState.SETTLED, PRICE_ATOMIC)
    kept = await open_ledger(LedgerLocation(kind="sqlite", path=ledger), replica="reader")
    try:
        assert [(r.kind, r.token) for r in await kept.receipts(charged.id)] == [("reply", token)]
        tokens = [
            r.token for record in found for r in await kept.receipts(record.id) if r.kind == "reply"
        ]
    finally:
        await kept.close()
    leaf = merkle.leaf_hash(receipts.signed_bytes(token))
    assert leaf not in _tlog_leaves(ledger)
    assert len(tokens) == 2  # the channel's deposit request's receipt, logged as usual, and it
    # The restart, on the same ledger: the receipt is recorded, once, and a period covers it.
    restarted = {**logged, "log_receipt_period": 1, "log_recovery_grace": 0}
    async with chain_batch(seller, ledger, anvil, gas_key, **restarted) as stack:
        url = stack.url + f"/v1/log/receipt-proof?leaf={leaf.hex()}"
        async with asyncio.timeout(30):
            while True:
                async with stack.client.get(url) as response:
                    if response.status == 200:
                        proof = await response.json()
                        break
                    assert response.status == 404, await response.text()
                await asyncio.sleep(0.2)
        vkey = log_identity(ORIGIN, stack.key).key
        audited = await asyncio.to_thread(_audit, stack.url, token, vkey)
        assert audited.returncode == 0, audited.stderr
        assert "1 receipts proven" in audited.stdout, audited.stdout
    assert _tlog_leaves(ledger).count(leaf) == 1
    entry = _log_entries(ledger)[proof["entry"]]
    assert entry["type"] == "receipts"
    merkle.verify_inclusion(
        leaf,
        proof["position"],
        entry["count"],
        [base64.b64decode(h) for h in proof["proof"]],
        bytes.fromhex(entry["root"]),
    )
    # The log's totals count every charge the ledger kept a receipt for: the lost one too.
    periods = [e for e in _log_entries(ledger) if e["type"] == "receipts"]
    assert sum(p["count"] for p in periods) == 2
    stated = sum(int(receipts.unverified_claims(t)["payment"]["charged"]) for t in tokens)
    assert sum(int(p["charged"]) for p in periods) == stated == 2 * PRICE_ATOMIC


# --- the recovery on both stores -----------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> LedgerLocation:
    if request.param == "sqlite":
        return LedgerLocation(kind="sqlite", path=tmp_path / "payments.db")
    return parse_ledger_url(request.getfixturevalue("pg_url"))


KEY = SoftwareKey.generate()


def _token(n: int, charged: int) -> str:
    claims = {
        "kind": "reply",
        "request_digest": "sha256:" + f"{n:064x}",
        "reply_digest": "sha256:" + "ab" * 32,
        "model": "fake-llama",
        "model_digest": None,
        "usage": None,
        "payment": {
            "id": f"0x{n:064x}",
            "scheme": "exact",
            "network": "eip155:84532",
            "asset": "0x" + "33" * 20,
            "pay_to": "0x" + "22" * 20,
            "payer": "0x" + "11" * 20,
            "authorized": str(charged),
            "charged": str(charged),
            "prices": None,
            "transaction": "pending",
        },
        "issued_at": 1_700_000_000 + n,
    }
    return receipts.sign(claims, KEY)


async def _keep(location: LedgerLocation, tokens: dict[int, str]) -> None:
    """Payments served, each with its reply receipt kept in the ledger (as a request keeps it)."""
    ledger = await open_ledger(location, replica="server")
    try:
        for n, token in tokens.items():
            record = await ledger.reserve(**request(n))
            await ledger.mark_served(record.id)
            await ledger.add_receipt(record.id, "reply", token)
    finally:
        await ledger.close()


@contextlib.asynccontextmanager
async def _log(
    location: LedgerLocation, replica: str = "r1", events: Any = None, **recovery: Any
) -> AsyncIterator[TransparencyLog]:
    store = await open_log_store(location)
    config = LogConfig(
        origin=ORIGIN, replica=replica, recovery=RecoveryConfig(**{"grace": 0.0, **recovery})
    )
    tlog = TransparencyLog(config, store, KEY, events)
    try:
        yield tlog
    finally:
        await tlog.close()


async def _leaves(tlog: TransparencyLog, tokens: list[str]) -> list[int]:
    """How many times the log recorded each token's leaf."""
    store: Any = tlog._store
    return [await store._read(_count_plan(store.SQL, receipt_facts(t).leaf)) for t in tokens]


def _count_plan(sql: Any, leaf: bytes) -> Any:
    rows = yield sql._sql("SELECT COUNT(*) FROM tlog_receipts WHERE leaf = ?"), (leaf,)
    return int(rows[0][0])


async def _last_entry(tlog: TransparencyLog) -> dict[str, Any]:
    latest = await tlog._store.latest()
    assert latest is not None
    bundle = await tlog._store.bundle(0, latest.size)
    assert bundle is not None
    return entries.parse(bundle[-1])


async def test_each_kept_receipt_the_log_lacks_is_recorded_once(location):
    tokens = {n: _token(n, 1000 * n) for n in (1, 2, 3)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        await tlog.start([b"genesis"])
        await tlog.record_receipt(tokens[2])  # this one its request recorded
        first = await tlog.recovery.pass_once()
        assert (first.read, first.recorded) == (3, 2)
        assert await _leaves(tlog, list(tokens.values())) == [1, 1, 1]
        again = await tlog.recovery.pass_once()  # nothing new kept since: nothing read
        assert (again.read, again.recorded) == (0, 0)
        assert await tlog.append_period() is not None
        entry = await _last_entry(tlog)
        assert (entry["type"], entry["count"], entry["charged"]) == ("receipts", 3, "6000")
    async with _log(location, "r2") as other:  # another process's first pass: none twice
        assert (await other.recovery.pass_once()).recorded == 0
        assert await _leaves(other, list(tokens.values())) == [1, 1, 1]
        period = await other._store.receipt_period(receipt_facts(tokens[1]).leaf)
    assert period is not None
    assert sorted(period.leaves) == sorted(receipt_facts(t).leaf for t in tokens.values())


async def test_a_pass_reads_at_most_its_batch_and_the_next_goes_on(location):
    tokens = {n: _token(n, 10) for n in range(1, 6)}
    await _keep(location, tokens)
    async with _log(location, batch=2) as tlog:
        await tlog.start([b"genesis"])
        passes = [await tlog.recovery.pass_once() for _ in range(4)]
        assert [(p.read, p.recorded) for p in passes] == [(2, 2), (2, 2), (1, 1), (0, 0)]
        assert await _leaves(tlog, list(tokens.values())) == [1] * 5


async def test_two_recoveries_at_once_record_each_receipt_once(location):
    """Both read the ledger and find the same receipts missing before either writes (held at a
    barrier): the write's re-check under the append lock records each once."""
    tokens = {n: _token(n, 7) for n in (1, 2, 3, 4)}
    await _keep(location, tokens)
    async with _log(location, "r1") as one, _log(location, "r2") as two:
        await one.start([b"genesis"])
        barrier = asyncio.Barrier(2)
        for tlog in (one, two):
            store: Any = tlog._store
            real = store.record_missing

            async def held(missing: Any, replica: str, real: Any = real) -> int:
                assert len(missing) == 4  # both found all four missing
                await asyncio.wait_for(barrier.wait(), 10)
                return await real(missing, replica)

            store.record_missing = held
        passes = await asyncio.gather(one.recovery.pass_once(), two.recovery.pass_once())
        assert sorted(p.recorded for p in passes) == [0, 4]
        assert await _leaves(one, list(tokens.values())) == [1] * 4
        assert await one.append_period() is not None
        entry = await _last_entry(one)
        assert (entry["count"], entry["charged"]) == (4, "28")  # each charge counted once


async def test_a_receipt_kept_within_the_grace_is_left_to_its_process(location):
    """A receipt just kept may still be on its way to the log from the process that signed it
    (it records it right after): recovery leaves it alone until ``grace`` has passed."""
    tokens = {1: _token(1, 5)}
    await _keep(location, tokens)
    async with _log(location, grace=3600.0) as tlog:
        await tlog.start([b"genesis"])
        assert await tlog.recovery.pass_once() == Pass(read=0, recorded=0)
        assert await _leaves(tlog, [tokens[1]]) == [0]
    async with _log(location) as later:  # once the grace is over
        assert (await later.recovery.pass_once()).recorded == 1


async def test_an_unreadable_kept_token_is_passed_over(location):
    tokens = {1: "not a token", 2: _token(2, 9)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        await tlog.start([b"genesis"])
        done = await tlog.recovery.pass_once()
        assert (done.read, done.recorded) == (2, 1)
        assert await _leaves(tlog, [tokens[2]]) == [1]
        assert (await tlog.recovery.pass_once()).read == 0  # its place moved past both


async def test_a_failed_write_is_retried_from_the_same_place(location):
    tokens = {1: _token(1, 3), 2: _token(2, 4)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        await tlog.start([b"genesis"])
        store: Any = tlog._store
        real = store.record_missing

        async def fails(missing: Any, replica: str) -> int:
            store.record_missing = real  # once
            raise LogStoreError("the log store failed: OperationalError")

        store.record_missing = fails
        with pytest.raises(LogStoreError):
            await tlog.recovery.pass_once()
        assert (await tlog.recovery.pass_once()).recorded == 2
        assert await _leaves(tlog, list(tokens.values())) == [1, 1]


async def test_a_backlog_is_read_batch_after_batch_without_waiting_the_interval(location):
    tokens = {n: _token(n, 1) for n in range(1, 8)}
    await _keep(location, tokens)
    async with _log(location, batch=2, interval=3600.0) as tlog:
        await tlog.start([b"genesis"])
        runner = asyncio.create_task(tlog.recovery.run())
        try:
            async with asyncio.timeout(20):
                while await _leaves(tlog, list(tokens.values())) != [1] * 7:
                    await asyncio.sleep(0.05)
        finally:
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner


async def test_a_receipt_its_frozen_process_records_after_recovery_is_counted_once(location):
    """The residual race: a process frozen past the grace between keeping a receipt and
    recording it wakes after recovery recorded it and records it again (the request path does
    not look first). The period cut counts that leaf once: its charge is in one period's
    total, before or after the first period covering it was published."""
    tokens = {1: _token(1, 500), 2: _token(2, 700)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        await tlog.start([b"genesis"])
        assert (await tlog.recovery.pass_once()).recorded == 2
        await tlog.record_receipt(tokens[2])  # woke before the cut: both open at once
        assert await tlog.append_period() is not None
        entry = await _last_entry(tlog)
        assert (entry["count"], entry["charged"]) == (2, "1200")
        await tlog.record_receipt(tokens[1])  # woke after the cut: its period is published
        assert await tlog.append_period() is None  # no second period counting it again
        period = await tlog._store.receipt_period(receipt_facts(tokens[1]).leaf)
        assert period is not None
        assert len(period.leaves) == 2
        assert await _leaves(tlog, list(tokens.values())) == [1, 1]


def _kept_earlier_plan(sql: Any, payment_nonce_n: int, seconds: float) -> Any:
    """Move a kept receipt ``seconds`` back in the ledger's time (as if kept that long ago)."""
    yield (
        sql._sql(
            "UPDATE receipts SET created_at = created_at - ?"
            " WHERE payment_id = (SELECT id FROM payments WHERE nonce = ?)"
        ),
        (seconds, request(payment_nonce_n)["nonce"]),
    )
    return None


async def test_a_restart_reaches_back_past_the_grace_and_interval_whatever_the_window(location):
    """The process that died had scanned up to ``grace`` (plus at most one ``interval``) before
    its last pass: a restart's first pass must reach that far back before the newest receipt,
    even where ``log_recovery_window`` was set shorter, or the receipts kept in between are
    never recovered."""
    tokens = {1: _token(1, 11), 2: _token(2, 13)}
    await _keep(location, tokens)
    async with _log(location, window=0.0, grace=0.0, interval=60.0) as tlog:
        store: Any = tlog._store
        await store._write(_kept_earlier_plan(store.SQL, 1, 40.0))  # 40 s before the newest
        await tlog.start([b"genesis"])
        done = await tlog.recovery.pass_once()
        assert (done.read, done.recorded) == (2, 2)
        assert await _leaves(tlog, list(tokens.values())) == [1, 1]


def _kept_long_ago_plan(sql: Any, seconds: float) -> Any:
    yield sql._sql("UPDATE receipts SET created_at = created_at - ?"), (seconds,)
    return None


async def _said(location: LedgerLocation, caplog: Any, **recovery: Any) -> list[str]:
    async with _log(location, batch=2, interval=30.0, **recovery) as tlog:
        await tlog.start([b"genesis"])
        with caplog.at_level("INFO", logger="paygate.tlog"):
            for _ in range(4):
                await tlog.recovery.pass_once()
    return [r.getMessage() for r in caplog.records if "receipts recovery" in r.getMessage()]


async def test_the_operator_is_told_where_recovery_starts_and_when_it_is_behind(location, caplog):
    """A first pass says from when it reads (what is older is not looked at); full batches of
    receipts kept long ago say recovery is behind (once, not per batch), and the pass that
    catches up says so."""
    tokens = {n: _token(n, 1) for n in range(1, 6)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        store: Any = tlog._store
        await store._write(_kept_long_ago_plan(store.SQL, 600.0))
    said = await _said(location, caplog, window=3600.0)
    assert [m.split(":")[0].split(" at ")[0] for m in said] == [
        "receipts recovery starts",
        "receipts recovery is behind",
        "receipts recovery caught up",
    ]
    assert said[-1].endswith("read 5 kept receipts, recorded 5")


async def test_full_batches_of_fresh_receipts_are_not_called_behind(location, caplog):
    """A busy ledger fills every batch; that alone is not being behind (no warning at every
    interval)."""
    await _keep(location, {n: _token(n, 1) for n in range(1, 6)})
    said = await _said(location, caplog)
    assert [m for m in said if "behind" in m or "caught up" in m] == []


async def test_a_kept_token_with_an_absurd_time_does_not_stall_recovery(location):
    """A kept token whose ``issued_at`` no float holds (10**400): the pass records the others
    and moves past it, rather than failing at the same place on every pass for ever."""
    absurd = b'{"issued_at":1' + b"0" * 400 + b',"kind":"reply"}'
    token = base64.urlsafe_b64encode(absurd).decode().rstrip("=") + ".AA"
    tokens = {1: token, 2: _token(2, 9)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        await tlog.start([b"genesis"])
        done = await tlog.recovery.pass_once()
        assert done.read == 2
        assert await _leaves(tlog, [tokens[2]]) == [1]
        assert (await tlog.recovery.pass_once()).read == 0


async def test_a_pass_lets_requests_run_between_short_runs_of_kept_receipts(location):
    """Hashing a batch (up to 1000 tokens) is tens of milliseconds of the event loop: a pass
    lets other tasks (the requests of this worker) run between short runs of it."""
    tokens = {n: _token(n, 1) for n in range(1, 201)}
    await _keep(location, tokens)
    async with _log(location, batch=200) as tlog:
        await tlog.start([b"genesis"])
        seen = 0
        real = tlog.recovery._facts

        def counted(token: str) -> Any:
            nonlocal seen
            seen += 1
            return real(token)

        tlog.recovery._facts = counted
        ticks: list[int] = []
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                ticks.append(seen)
                await asyncio.sleep(0)

        watching = asyncio.create_task(ticker())
        try:
            assert (await tlog.recovery.pass_once()).recorded == 200
        finally:
            done.set()
            await asyncio.wait_for(watching, 10)
        runs = [b - a for a, b in itertools.pairwise(ticks)]
        assert seen == 200
        assert max(runs) <= 64  # never the whole batch at once


def _same_time_plan(sql: Any) -> Any:
    yield "UPDATE receipts SET created_at = (SELECT MAX(created_at) FROM receipts)", ()
    return None


async def test_receipts_kept_at_the_same_time_are_each_read_across_batch_boundaries(location):
    """Five receipts with one kept time, read two a pass: the place is (time, payment id,
    kind), so a batch ending inside the tie neither rereads nor skips the rest of it."""
    tokens = {n: _token(n, 1) for n in range(1, 6)}
    await _keep(location, tokens)
    async with _log(location, batch=2) as tlog:
        store: Any = tlog._store
        await store._write(_same_time_plan(store.SQL))
        await tlog.start([b"genesis"])
        passes = [await tlog.recovery.pass_once() for _ in range(4)]
        assert [(p.read, p.recorded) for p in passes] == [(2, 2), (2, 2), (1, 1), (0, 0)]
        assert await _leaves(tlog, list(tokens.values())) == [1] * 5


async def test_a_twin_recorded_during_the_cut_is_not_counted_in_that_period(location, monkeypatch):
    """The frozen process's second record can commit inside a cut, after its drop of twins
    and before its read of the open receipts (PostgreSQL reads each statement afresh): that
    read itself leaves out a leaf the log holds at a lower seq."""
    tokens = {1: _token(1, 500)}
    await _keep(location, tokens)
    async with _log(location) as tlog:
        await tlog.start([b"genesis"])
        assert (await tlog.recovery.pass_once()).recorded == 1
        assert await tlog.append_period() is not None
        await tlog.record_receipt(tokens[1])  # the twin, as if after the drop
        store: Any = tlog._store
        monkeypatch.setattr(store.SQL, "drop_recorded_again", "SELECT 1")
        assert await tlog.append_period() is None


async def test_close_ends_a_recovery_pass_stuck_in_its_store(location):
    """close() cancels the recovery wherever it waits, here inside a store read that never
    answers, and returns (the app's cleanup does not hang on it)."""
    await _keep(location, {1: _token(1, 1)})
    store = await open_log_store(location)
    tlog = TransparencyLog(LogConfig(origin=ORIGIN, replica="r1"), store, KEY)
    await tlog.start([b"genesis"])
    entered = asyncio.Event()

    async def never(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        await asyncio.Event().wait()

    tlog._store.kept_receipts = never  # type: ignore[method-assign]
    tlog.spawn_periods()
    await asyncio.wait_for(entered.wait(), 10)
    await asyncio.wait_for(tlog.close(), 10)
    assert not tlog._tasks


# --- the metrics an operator alerts on -----------------------------------------------------


def _scraped(text: str) -> dict[str, float]:
    """The unlabelled samples of a scrape, by name."""
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.labels
    }


async def test_a_gateway_shows_the_receipts_it_recovered_on_its_metrics(tmp_path):
    """A real gap: the ledger keeps three receipts its log never recorded; the gateway started
    on it recovers them, and /metrics says so (and that it is caught up)."""
    settings = gateway_settings(tmp_path, log_recovery_grace=0)
    location = LedgerLocation(kind="sqlite", path=settings["ledger_path"])
    tokens = {n: _token(n, 100 * n) for n in (1, 2, 3)}
    await _keep(location, tokens)
    async with running_stack(**settings) as stack:
        async with asyncio.timeout(30):
            while True:
                async with stack.client.get(stack.url + "/metrics") as response:
                    assert response.status == 200
                    seen = _scraped(await response.text())
                if seen.get("paygate_tlog_recovery_scan_seconds_count", 0) >= 1:
                    break
                await asyncio.sleep(0.1)
    assert seen["paygate_tlog_recovered_receipts_total"] == 3
    assert seen["paygate_tlog_recovery_failures_total"] == 0
    assert seen["paygate_tlog_recovery_lag_seconds"] < 30  # caught up: a pass ago at most
    assert seen["paygate_tlog_recovery_checked_timestamp_seconds"] > 0
    assert _tlog_leaves(settings["ledger_path"]).count(receipt_facts(tokens[2]).leaf) == 1


async def test_failed_passes_are_counted_and_their_lag_grows(location):
    metrics = Metrics()
    await _keep(location, {1: _token(1, 3)})
    async with _log(location, events=metrics, grace=5.0) as tlog:
        await tlog.start([b"genesis"])
        store: Any = tlog._store
        await store._write(_kept_long_ago_plan(store.SQL, 60.0))
        assert (await tlog.recovery.pass_once()).recorded == 1
        caught_up = _scraped(metrics.render(in_flight=0).decode())
        assert caught_up["paygate_tlog_recovered_receipts_total"] == 1
        assert caught_up["paygate_tlog_recovery_lag_seconds"] < 5
        checked = caught_up["paygate_tlog_recovery_checked_timestamp_seconds"]

        async def fails(*args: Any, **kwargs: Any) -> Any:
            raise LogStoreError("the log store failed: OperationalError")

        store.kept_receipts = fails
        for _ in range(2):
            with pytest.raises(LogStoreError):
                await tlog.recovery.pass_once()
        metrics.recovery_checked(checked - 600.0, 5.0)  # as if that pass was ten minutes ago
        failing = _scraped(metrics.render(in_flight=0).decode())
    assert failing["paygate_tlog_recovery_failures_total"] == 2
    assert failing["paygate_tlog_recovery_scan_seconds_count"] == 1  # failures are not passes
    assert failing["paygate_tlog_recovery_lag_seconds"] >= 595


async def test_a_backlog_shows_as_lag_until_it_is_read(location):
    """Full batches of receipts kept ten minutes ago: the lag says how far behind the scan is,
    and drops to 0 once the pass that reads the rest has run."""
    metrics = Metrics()
    await _keep(location, {n: _token(n, 1) for n in range(1, 6)})
    async with _log(location, events=metrics, batch=2, window=3600.0) as tlog:
        store: Any = tlog._store
        await store._write(_kept_long_ago_plan(store.SQL, 600.0))
        await tlog.start([b"genesis"])
        await tlog.recovery.pass_once()
        behind = _scraped(metrics.render(in_flight=0).decode())
        for _ in range(2):
            await tlog.recovery.pass_once()
        caught_up = _scraped(metrics.render(in_flight=0).decode())
    assert 590 <= behind["paygate_tlog_recovery_lag_seconds"] < 700
    assert caught_up["paygate_tlog_recovery_lag_seconds"] < 5
    assert caught_up["paygate_tlog_recovered_receipts_total"] == 5
