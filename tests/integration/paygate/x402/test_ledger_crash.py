"""The ledger across real processes: a cross-process race, a hard kill, and the operator CLI."""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger

ROOT = Path(__file__).resolve().parents[4]
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
PAYER = "0x857b06519E91e3A54538791bDbb0E22373e36b66"
PAY_TO = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
SIGNATURE = "0x" + "5a" * 65
KEYS = 60

# Shared by the child processes: reserve(ledger, n) claims nonce n for the same payer.
PRELUDE = f"""
import asyncio, json, os, signal, sys
from paygate.x402.ledger import AlreadyReserved, PaymentState
from paygate.x402.ledger_sqlite import SqliteLedger

def reserve(ledger, n):
    return ledger.reserve(
        network="eip155:84532", asset="{USDC}", payer="{PAYER}", nonce="0x%064x" % n,
        pay_to="{PAY_TO}", amount=1000, x402_version=2, route="chat.completions",
        payload='{{"signature":"{SIGNATURE}"}}', requirements="{{}}", idempotency_key=None,
    )
"""

RACER = """
async def main(path):
    ledger = await SqliteLedger.open(path, busy_timeout=20)
    print("ready", flush=True)
    sys.stdin.readline()  # "go": both processes start together
    won = []
    keys = range(1, int(sys.argv[2]) + 1)
    # Key 0 first, together; then opposite orders, so the two meet and collide mid-way.
    for n in [0, *(keys if sys.argv[3] == "up" else reversed(keys))]:
        try:
            won.append((await reserve(ledger, n)).nonce)
        except AlreadyReserved:
            pass
    await ledger.close()
    print(json.dumps(won), flush=True)

asyncio.run(main(sys.argv[1]))
"""

KILLED = """
async def main(path):
    ledger = await SqliteLedger.open(path)
    record = await reserve(ledger, 1)
    for state in (PaymentState.VERIFIED, PaymentState.SERVED):
        await ledger.transition(record.id, state)
    tx = "0x" + "ab" * 32
    record = await ledger.transition(record.id, PaymentState.SETTLING, transaction=tx)
    print(record.id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint, no atexit

asyncio.run(main(sys.argv[1]))
"""

SURVIVOR = """
async def main(path):
    ledger = await SqliteLedger.open(path)
    rows = [(r.id, r.state.value, r.attempts, r.transaction) for r in await ledger.unfinished()]
    await ledger.close()
    print(json.dumps(rows), flush=True)

asyncio.run(main(sys.argv[1]))
"""


KILLED_BEFORE_COMMIT = """
import time

async def main(path):
    ledger = await SqliteLedger.open(path)
    kept = await reserve(ledger, 1)
    print("acknowledged", kept.id, flush=True)
    await ledger.scheme_sql("CREATE TABLE pairs (k INTEGER PRIMARY KEY, v TEXT)", ())

    def stall(calls):  # the statements ran on the event loop; the COMMIT never comes
        print("committing", calls, flush=True)
        time.sleep(60)

    ledger.group_commit.before_commit = stall
    await asyncio.gather(
        reserve(ledger, 2),
        ledger.transition(kept.id, PaymentState.SERVED, via=PaymentState.VERIFIED),
        ledger.scheme_sql_all([
            ("INSERT INTO pairs (k, v) VALUES (1, 'voucher')", ()),
            ("INSERT INTO pairs (k, v) VALUES (2, 'charge')", ()),
        ]),
    )
    print("answered before the COMMIT", flush=True)

asyncio.run(main(sys.argv[1]))
"""


def child(script: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PRELUDE + script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return proc.stdout.readline().strip()


def finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)
        raise
    return out, err


def test_two_processes_racing_for_the_same_keys_have_one_winner_each(tmp_path: Path) -> None:
    path = str(tmp_path / "payments.db")
    racers = [child(RACER, path, str(KEYS), order) for order in ("up", "down")]
    try:
        assert [read_line(p, 30) for p in racers] == ["ready", "ready"]
        for proc in racers:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        results = []
        for proc in racers:
            out, err = finish(proc)
            assert proc.returncode == 0, err
            results.append(set(json.loads(out)))
    finally:
        for proc in racers:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    assert not results[0] & results[1]
    assert len(results[0] | results[1]) == KEYS + 1
    assert f"0x{0:064x}" in results[0] | results[1]

    async def rows() -> int:
        async with await SqliteLedger.open(path, read_only=True) as ledger:
            return len(await ledger.list(limit=KEYS * 2))

    assert asyncio.run(rows()) == KEYS + 1


def test_a_settlement_recorded_before_a_hard_kill_is_found_by_the_next_process(
    tmp_path: Path,
) -> None:
    path = tmp_path / "payments.db"
    killed = child(KILLED, str(path))
    payment_id = read_line(killed, 30)
    _, err = finish(killed)
    assert killed.returncode == -signal.SIGKILL, err
    assert Path(f"{path}-wal").stat().st_size > 0  # the rows live in the WAL, not yet merged

    survivor = child(SURVIVOR, str(path))
    out, err = finish(survivor)
    assert survivor.returncode == 0, err
    assert json.loads(out) == [[payment_id, "settling", 1, "0x" + "ab" * 32]]


def test_a_kill_between_the_loops_statements_and_the_commit_leaves_nothing_half_written(
    tmp_path: Path,
) -> None:
    """SIGKILL after a group's statements ran on the event loop and before the worker's COMMIT:
    what was acknowledged is there, none of the group is (not a row, not one of two moves, not
    one of a voucher's two statements), and nobody heard of it."""
    path = tmp_path / "payments.db"
    killed = child(KILLED_BEFORE_COMMIT, str(path))
    lines: list[str] = []
    try:
        while not lines or not lines[-1].startswith("committing"):
            lines.append(read_line(killed, 60))
            assert lines[-1], "the child ended"
        os.kill(killed.pid, signal.SIGKILL)
        out, err = finish(killed)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait(timeout=10)
    assert killed.returncode == -signal.SIGKILL, err
    assert out.split() == []  # nobody was answered after the statements
    assert lines[-1] == "committing 3"  # the three calls' statements ran, in one group
    kept = lines[0].split()[1]
    db = sqlite3.connect(path)
    try:
        payments = db.execute("SELECT id, state FROM payments").fetchall()
        events = db.execute("SELECT action, state FROM payment_events ORDER BY rowid").fetchall()
        held = db.execute("SELECT history FROM payments").fetchall()
        pairs = db.execute("SELECT k FROM pairs").fetchall()
    finally:
        db.close()
    assert payments == [(kept, "reserved")]  # not served, not half-moved; no second payment
    # Its history, kept in its row (schema v12): the reservation alone.
    assert events == []
    assert [[(a, s) for _, _, a, s, _ in json.loads(h)] for (h,) in held] == [
        [("reserved", "reserved")]
    ]
    assert pairs == []  # neither of the two statements


# --- the operator CLI ---------------------------------------------------------------------


def cli(*args: str, ledger: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "payments", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PAYGATE_LEDGER_PATH": str(ledger)},
    )


async def fill(path: Path) -> dict[str, str]:
    """Three payments: settled, failed, and one still reserved (the newest)."""
    now = [1_700_000_000.0]
    async with await SqliteLedger.open(path, clock=lambda: now[0]) as ledger:
        ids: dict[str, str] = {}
        for n, name in enumerate(("settled", "failed", "reserved"), start=1):
            record = await ledger.reserve(
                network="eip155:84532",
                asset=USDC,
                payer=PAYER,
                nonce=f"0x{n:064x}",
                pay_to=PAY_TO,
                amount=1500 * n,
                x402_version=2,
                route="chat.completions",
                payload=json.dumps({"payload": {"signature": SIGNATURE}}),
                requirements=json.dumps({"scheme": "exact", "amount": str(1500 * n)}),
                idempotency_key=None,
            )
            ids[name] = record.id
            now[0] += 60
        await ledger.transition(ids["settled"], PaymentState.SETTLING)
        await ledger.transition(ids["settled"], PaymentState.SETTLED, transaction="0x" + "cd" * 32)
        await ledger.mark_served(ids["settled"])
        await ledger.transition(ids["failed"], PaymentState.FAILED, error="insufficient_funds")
        return ids


def test_cli_lists_and_shows_payments_without_their_signatures(tmp_path: Path) -> None:
    path = tmp_path / "payments.db"
    ids = asyncio.run(fill(path))

    listed = cli("list", "--json", ledger=path)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [ids["reserved"], ids["failed"], ids["settled"]]
    assert [r["state"] for r in rows] == ["reserved", "failed", "settled"]
    assert rows[2]["served"] is True
    assert rows[2]["amount_usdc"] == "0.001500"
    assert rows[2]["transaction"] == "0x" + "cd" * 32
    assert rows[1]["error"] == "insufficient_funds"
    assert all(r["payload_stored"] for r in rows)

    table = cli("list", ledger=path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATE",
        "SCHEME",
        "SERVED",
        "NETWORK",
        "PAYER",
        "USDC",
        "TOKENS",
        "SETTLED",
        "TX",
        "AGE",
        "ERROR",
    ]
    assert lines[3].split()[:7] == [
        ids["settled"],
        "settled",
        "exact",
        "yes",
        "eip155:84532",
        "0x857b…6b66",
        "0.001500",
    ]
    assert "0xcdcdcd…cdcdcd" in lines[3]
    assert lines[2].split()[-1] == "insufficient_funds"

    failed = cli("list", "--state", "failed", "--json", ledger=path)
    assert [r["id"] for r in json.loads(failed.stdout)] == [ids["failed"]]
    assert len(json.loads(cli("list", "--limit", "1", "--json", ledger=path).stdout)) == 1

    shown = cli("show", ids["settled"], "--json", ledger=path)
    assert shown.returncode == 0, shown.stderr
    facts = json.loads(shown.stdout)
    assert (facts["id"], facts["state"], facts["nonce"]) == (
        ids["settled"],
        "settled",
        f"0x{1:064x}",
    )
    assert facts["requirements"] == {"scheme": "exact", "amount": "1500"}
    assert "payload" not in facts

    text = cli("show", ids["failed"], ledger=path)
    assert text.returncode == 0, text.stderr
    assert "stored (signed; not shown)" in text.stdout
    assert "insufficient_funds" in text.stdout

    for output in (listed, table, failed, shown, text):
        assert SIGNATURE[2:12] not in output.stdout + output.stderr


def test_cli_errors_are_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "payments.db"
    absent = cli("list", ledger=missing)
    assert (absent.returncode, absent.stderr.split("]")[0]) == (2, "error [ledger_not_found")
    assert not missing.parent.exists()  # read-only: nothing created

    path = tmp_path / "payments.db"
    asyncio.run(fill(path))
    unknown = cli("show", "0" * 32, ledger=path)
    assert (unknown.returncode, unknown.stderr.split("]")[0]) == (2, "error [payment_not_found")
    bad_limit = cli("list", "--limit", "0", ledger=path)
    assert bad_limit.returncode == 2
    assert "Traceback" not in absent.stderr + unknown.stderr + bad_limit.stderr
