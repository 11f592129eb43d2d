"""Stopping the group commit (paygate.x402.ledger_commit.GroupCommit.stop) while the event loop
has a group open — its statements ran on the loop, the hand-off of its COMMIT to the worker is
still to come in the same loop iteration: this is what a store's close() meets when requests
are still in flight. stop() blocks the loop's thread, so it must hand the group off itself:
it returns, and every call it had accepted is committed (or failed with a clear error), never
silently dropped. Each scenario runs on a thread of its own under a bounded wait, so that a
deadlock fails the test instead of hanging it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from paygate.x402 import ledger_commit
from paygate.x402.ledger_commit import GroupCommit

BOUND = 30.0  # seconds: far beyond what any scenario takes when nothing deadlocks


class Lost(Exception):
    pass


def _connect(path: Path) -> sqlite3.Connection:
    # As the ledger's: transactions by hand, shared by the loop's thread and the worker.
    db = sqlite3.connect(path, isolation_level=None, timeout=0, check_same_thread=False)
    db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY)")
    return db


def _rows(path: Path) -> list[int]:
    db = sqlite3.connect(path)  # another connection: sees committed rows only
    try:
        return [row[0] for row in db.execute("SELECT n FROM t ORDER BY n")]
    finally:
        db.close()


def _bounded(
    scenario: Callable[[], Coroutine[Any, Any, Any]], hung: str = "stop() deadlocked"
) -> Any:
    """Run ``scenario`` on an event loop of its own thread; fail (not hang) if it does not end."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(asyncio.run(scenario()))
        except BaseException as exc:  # reported below
            outcome.append(exc)

    thread = threading.Thread(target=run, name="scenario", daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), hung
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _group_commit(db: sqlite3.Connection) -> tuple[GroupCommit, Callable[[int], int]]:
    commits = GroupCommit("test-group-commit", Lost, connection=lambda: db)

    def write(n: int) -> int:
        with commits.transaction(db) as conn:
            conn.execute("INSERT INTO t VALUES (?)", (n,))
        return n

    return commits, write


@pytest.mark.parametrize("behind", [False, True])
def test_stop_on_the_loop_with_a_group_open_commits_what_it_accepted(
    tmp_path: Path, behind: bool
) -> None:
    """Writes of an open group (and, ``behind``, calls queued on the loop behind it: one for
    the worker, one quick) are all committed, in order, and answered."""
    path = tmp_path / "t.db"
    db = _connect(path)

    async def scenario() -> list[Any]:
        commits, write = _group_commit(db)
        futures = [commits.submit(write, n, quick=True) for n in (1, 2, 3)]
        if behind:
            futures.append(commits.submit(write, 4))  # not quick: waits behind the group
            futures.append(commits.submit(write, 5, quick=True))  # in order, after it
        assert _rows(path) == []  # the group's statements ran; its COMMIT is not handed off
        commits.stop()  # on the loop's thread, in the same iteration
        async with asyncio.timeout(BOUND):
            return await asyncio.gather(*futures, return_exceptions=True)

    try:
        outcomes = _bounded(scenario)
    finally:
        db.close()
    expected = [1, 2, 3, 4, 5] if behind else [1, 2, 3]
    assert outcomes == expected
    assert _rows(path) == expected


def test_stop_on_the_loop_with_a_group_that_only_read_returns(tmp_path: Path) -> None:
    """A group that wrote nothing (a read, a call that failed — the store's close() meeting
    calls that found the connection closed) still holds the connection for the loop."""
    path = tmp_path / "t.db"
    db = _connect(path)
    db.execute("INSERT INTO t VALUES (7)")

    async def scenario() -> list[Any]:
        commits = GroupCommit("test-group-commit", Lost, connection=lambda: db)

        def fails() -> None:
            raise Lost("the store is closed")

        read = commits.submit(lambda: db.execute("SELECT n FROM t").fetchall(), quick=True)
        failed = commits.submit(fails, quick=True)
        commits.stop()
        async with asyncio.timeout(BOUND):
            return await asyncio.gather(read, failed, return_exceptions=True)

    try:
        rows, failed = _bounded(scenario)
    finally:
        db.close()
    assert rows == [(7,)]
    assert isinstance(failed, Lost)


def test_stop_from_another_thread_with_a_group_open_commits_it(tmp_path: Path) -> None:
    """The loop keeps running while another thread stops the worker: the loop hands the group
    off as usual and the worker commits it before it ends."""
    path = tmp_path / "t.db"
    db = _connect(path)

    async def scenario() -> list[Any]:
        commits, write = _group_commit(db)
        futures = [commits.submit(write, n, quick=True) for n in (1, 2)]
        stopping = asyncio.ensure_future(asyncio.to_thread(commits.stop))
        async with asyncio.timeout(BOUND):
            await stopping
            return await asyncio.gather(*futures, return_exceptions=True)

    try:
        outcomes = _bounded(scenario)
    finally:
        db.close()
    assert outcomes == [1, 2]
    assert _rows(path) == [1, 2]


def test_calls_after_stop_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    db = _connect(path)

    async def scenario() -> None:
        commits, write = _group_commit(db)
        commits.stop()
        with pytest.raises(RuntimeError, match="stopped"):
            commits.submit(write, 1, quick=True)

    try:
        _bounded(scenario)
    finally:
        db.close()
    assert _rows(path) == []


def test_the_idle_worker_looks_again_without_a_wake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's idle wait has a timeout (kept by the ticker): work it was not woken for
    (a lost wake) is still done, within the idle wait."""
    monkeypatch.setattr(ledger_commit, "IDLE_WAIT", 0.05, raising=False)
    path = tmp_path / "t.db"
    db = _connect(path)

    async def scenario() -> Any:
        commits, write = _group_commit(db)
        try:
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            call = ledger_commit._Call(write, (9,), loop, future)
            with commits._lock:  # queued, and no wake token put: as if it had been lost
                commits._queue.append(call)
            async with asyncio.timeout(BOUND):
                return await future
        finally:
            commits.stop()

    try:
        assert _bounded(scenario, "the idle worker never looked again") == 9
    finally:
        db.close()
    assert _rows(path) == [9]


class NotMade(Exception):
    """As the ledger's WriteNotMade: raised inside a call's transaction after a statement."""


def test_stop_on_the_loop_keeps_each_calls_savepoint(tmp_path: Path) -> None:
    """A call of the open group that wrote and then failed inside its transaction (the ledger's
    WriteNotMade) is rolled back to its savepoint and gets its error; the calls before and after
    it in the group are committed by the stop's hand-off."""
    path = tmp_path / "t.db"
    db = _connect(path)

    async def scenario() -> list[Any]:
        commits, write = _group_commit(db)

        def not_made(n: int) -> None:
            with commits.transaction(db) as conn:
                conn.execute("INSERT INTO t VALUES (?)", (n,))
                raise NotMade(n)

        futures = [
            commits.submit(write, 1, quick=True),
            commits.submit(not_made, 2, quick=True),
            commits.submit(write, 3, quick=True),
        ]
        commits.stop()
        async with asyncio.timeout(BOUND):
            return await asyncio.gather(*futures, return_exceptions=True)

    try:
        one, failed, three = _bounded(scenario)
    finally:
        db.close()
    assert (one, three) == (1, 3)
    assert isinstance(failed, NotMade)
    assert _rows(path) == [1, 3]


def test_stop_on_the_loop_with_the_write_lock_busy_runs_the_handed_calls(tmp_path: Path) -> None:
    """Another connection holds the write lock: the open group's calls are handed to the worker
    (which waits for the lock); stop() on the loop runs them before the worker ends."""
    path = tmp_path / "t.db"
    db = _connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def scenario() -> list[Any]:
        commits, write = _group_commit(db)
        futures = [commits.submit(write, n, quick=True) for n in (1, 2)]
        threading.Timer(0.2, other.execute, ("COMMIT",)).start()  # the lock, soon let go
        commits.stop()
        async with asyncio.timeout(BOUND):
            return await asyncio.gather(*futures, return_exceptions=True)

    try:
        outcomes = _bounded(scenario)
    finally:
        db.close()
        other.close()
    assert outcomes == [1, 2]
    assert _rows(path) == [1, 2]


def test_stop_from_another_thread_before_the_hand_off_runs_the_handed_calls(
    tmp_path: Path,
) -> None:
    """Another thread stops the worker while the loop's open group has calls that found the
    write lock busy, before the loop hands the group off: those calls still run (and are
    answered) before the worker ends, not queued behind its stop for nobody."""
    path = tmp_path / "t.db"
    db = _connect(path)
    db.execute("PRAGMA journal_mode = WAL")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")

    async def scenario() -> list[Any]:
        commits, write = _group_commit(db)
        futures = [commits.submit(write, n, quick=True) for n in (1, 2)]  # handed: lock busy
        stopper = threading.Thread(target=commits.stop, name="stopper", daemon=True)
        stopper.start()
        for _ in range(10_000):  # its stop queued (still in this loop iteration)
            with commits._lock:
                if commits._queue and commits._queue[-1] is None:
                    break
            time.sleep(0.001)  # blocking on purpose: the hand-off must not run yet
        other.execute("COMMIT")
        async with asyncio.timeout(5):
            outcomes = await asyncio.gather(*futures, return_exceptions=True)
        stopper.join(BOUND)
        return outcomes

    try:
        outcomes = _bounded(scenario)
    finally:
        db.close()
        other.close()
    assert outcomes == [1, 2]
    assert _rows(path) == [1, 2]


def test_stop_is_bounded_when_the_worker_is_stuck(tmp_path: Path) -> None:
    """A call that does not return (a disk that hangs): stop() gives up after its timeout with
    a clear error instead of blocking its caller for ever."""
    release = threading.Event()

    async def scenario() -> str:
        commits = GroupCommit("test-stuck", Lost)
        stuck = commits.submit(release.wait, BOUND)  # on the worker
        try:
            with pytest.raises(RuntimeError, match="did not finish in time"):
                commits.stop(timeout=0.2)
        finally:
            release.set()
        commits.stop()  # once it is free, the stop completes
        return "stopped" if await stuck else "not released"

    assert _bounded(scenario) == "stopped"


_FORKED = """
import asyncio, os, sys
from paygate.x402 import ledger_commit
from paygate.x402.ledger_commit import GroupCommit

ledger_commit.IDLE_WAIT = 0.05

async def lost_wake(commits):
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    with commits._lock:  # queued without a wake token: only the ticker finds it
        commits._queue.append(ledger_commit._Call(lambda: 7, (), loop, future))
    async with asyncio.timeout(10):
        return await future

parent = GroupCommit("parent", Exception)
assert asyncio.run(lost_wake(parent)) == 7
with ledger_commit._TICKER._lock:  # a fork while the ticker holds its lock
    pid = os.fork()
if pid == 0:
    child = GroupCommit("child", Exception)
    ok = asyncio.run(lost_wake(child)) == 7
    child.stop()
    os._exit(0 if ok else 1)
_, status = os.waitpid(pid, 0)
parent.stop()
sys.exit(os.waitstatus_to_exitcode(status))
"""


def test_a_forked_worker_process_has_its_own_ticker() -> None:
    """``paygate serve --workers`` forks: a child's group commits get idle-wait ticks of their
    own (the parent's ticker thread is not in the child), even when the fork caught the
    ticker's lock held."""
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-c", _FORKED], capture_output=True, text=True, timeout=BOUND
    )
    assert run.returncode == 0, run.stderr
