"""Group commit for the SQLite ledger: the transactions queued together share one COMMIT.

With ``synchronous=FULL`` every COMMIT is an fsync of the WAL, and an fsync costs more than the
statements of a ledger call. :class:`GroupCommit` is the ledger's one worker thread: it takes
every call queued while the previous group was committing (up to ``max_group``), runs them in
submission order inside one ``BEGIN IMMEDIATE … COMMIT``, each write in a savepoint of its own,
and commits once. Why it keeps every promise the one-transaction-per-call ledger made:

* **Durable before acknowledged**: no caller hears its outcome (a result *or* an error) before
  the COMMIT of its group returned; a crash before it loses only calls nobody was answered.
* **Isolated failures**: a call that fails (a constraint, a fence, a rule) is rolled back to its
  savepoint and gets its error; the others in the group commit. A failure that makes SQLite
  abandon the whole transaction (an I/O error, a full disk) fails every call of the group that
  had written, and a failed COMMIT fails the whole group: nothing acknowledged is lost.
* **Serialised**: calls still run one at a time in submission order on one connection, and the
  write lock (``BEGIN IMMEDIATE``) is held across the group, so another process sharing the file
  still sees each call's read-modify-write as atomic.
* **No waiting for company**: a lone call commits at once (no delay is added to gather a group);
  groups form only when calls arrive faster than fsyncs complete, which is when they help.

A call that reads only and comes before any write of its group runs outside the transaction;
after a write it runs inside it, so it waits for that COMMIT like the writers (it may have seen
their uncommitted rows). Calls that must not share a transaction (opening, migrating, closing
the connection) are submitted ``alone``.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

#: Calls per group at most: bounds how long the write lock is held and what one failed COMMIT
#: can take down.
MAX_GROUP = 64


@dataclass(slots=True)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    alone: bool = False
    in_transaction: bool = False  # ran after its group's BEGIN: it waits for the COMMIT
    ok: bool = True
    outcome: Any = None


@dataclass(slots=True)
class _Group:
    db: sqlite3.Connection | None = None  # set by the first write: BEGIN IMMEDIATE was run
    savepoints: int = 0
    calls: list[_Call] = field(default_factory=list)


class GroupCommit:
    """One worker thread running ledger calls in groups that share a COMMIT (see module doc).

    ``lost`` builds the error a call gets when its group's transaction is lost (COMMIT failed,
    or SQLite rolled it back under a later call). ``after_commit(n)``, if set, is called on the
    worker thread after each COMMIT of ``n`` calls (one fsync): for metrics and tests.
    """

    def __init__(
        self,
        name: str,
        lost: Callable[[sqlite3.Error], Exception],
        *,
        max_group: int = MAX_GROUP,
        after_commit: Callable[[int], None] | None = None,
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self.max_group = max_group
        self.after_commit = after_commit
        self._lost = lost
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._group: _Group | None = None  # only touched on the worker thread
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], *args: Any, alone: bool = False
    ) -> asyncio.Future[Any]:
        """Queue ``fn(*args)`` for the worker thread; the future resolves after its COMMIT."""
        if self._stopped:
            raise RuntimeError("the ledger's worker has stopped")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put(_Call(fn, args, loop, future, alone))
        return future

    def stop(self) -> None:
        """Run what is queued, then end the thread (blocks until it has ended)."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
        self._thread.join()

    @contextlib.contextmanager
    def transaction(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """One call's read-modify-write, all or nothing (a savepoint in its group's transaction,
        opened with ``BEGIN IMMEDIATE`` by the group's first write). Worker thread only."""
        group = self._group
        if group is None:  # not inside a group (cannot happen for submitted calls): plain
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            return
        if group.db is None:
            db.execute("BEGIN IMMEDIATE")
            group.db = db
        if len(group.calls) == 1:  # alone in its group: the transaction is its own
            try:
                yield db
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                group.db = None  # nothing left to commit
                raise
            return
        group.savepoints += 1
        name = f"call{group.savepoints}"
        db.execute(f"SAVEPOINT {name}")
        try:
            yield db
        except BaseException:
            if db.in_transaction:  # else SQLite already rolled the whole transaction back
                db.execute(f"ROLLBACK TO {name}")
                db.execute(f"RELEASE {name}")
            raise
        db.execute(f"RELEASE {name}")

    # --- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        held: _Call | None = None  # an `alone` call that ended the previous group
        stopping = False
        while True:
            if held is not None:
                call, held = held, None
            elif stopping:
                return
            else:
                got = self._queue.get()
                if got is None:
                    return
                call = got
            calls = [call]
            while not call.alone and len(calls) < self.max_group:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:  # stop once this group is done
                    stopping = True
                    break
                if more.alone:
                    held = more
                    break
                calls.append(more)
            self._run(calls)

    def _run(self, calls: list[_Call]) -> None:
        group = self._group = _Group(calls=calls)
        try:
            for call in calls:
                began = group.db is not None
                try:
                    call.outcome = call.fn(*call.args)
                except BaseException as exc:  # the caller gets it; the group goes on
                    call.ok, call.outcome = False, exc
                call.in_transaction = began or group.db is not None
                if group.db is not None and not group.db.in_transaction:
                    # SQLite rolled the whole transaction back (I/O error, disk full, ...):
                    # every earlier write of the group is gone with it.
                    self._fail(group, sqlite3.OperationalError("transaction rolled back"))
                    group.db, group.savepoints = None, 0
            if group.db is not None:
                try:
                    group.db.execute("COMMIT")
                except sqlite3.Error as exc:
                    with contextlib.suppress(sqlite3.Error):
                        if group.db.in_transaction:
                            group.db.execute("ROLLBACK")
                    self._fail(group, exc)
                else:
                    if self.after_commit is not None:
                        self.after_commit(sum(1 for c in calls if c.in_transaction))
        finally:
            self._group = None
            self._answer(calls)

    def _fail(self, group: _Group, exc: sqlite3.Error) -> None:
        for call in group.calls:
            if call.in_transaction and call.ok:
                call.ok, call.outcome = False, self._lost(exc)
            call.in_transaction = False

    @staticmethod
    def _answer(calls: list[_Call]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[_Call]] = {}
        for call in calls:
            by_loop.setdefault(call.loop, []).append(call)
        for loop, answered in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
                loop.call_soon_threadsafe(_resolve, answered)


def _resolve(calls: list[_Call]) -> None:
    """On the callers' loop: one callback answers every call of a group."""
    for call in calls:
        if call.future.done():  # cancelled: the change is done all the same; nobody hears
            continue
        if call.ok:
            call.future.set_result(call.outcome)
        else:
            call.future.set_exception(call.outcome)
