"""Group commit for the SQLite ledger: the transactions queued together share one COMMIT.

With ``synchronous=FULL`` every COMMIT is an fsync of the WAL, and an fsync costs more than the
statements of a ledger call. :class:`GroupCommit` runs the calls of one group in submission
order inside one ``BEGIN IMMEDIATE … COMMIT``, each write in a savepoint of its own, and commits
once. Why it keeps every promise the one-transaction-per-call ledger made:

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

**Where the statements run.** Handing every call to a worker thread and back costs more CPU
than its statements (a futex wake, the event loop's self-pipe, the GIL passed back and forth
with every ``sqlite3`` statement). So, when the store gives the connection (``connection``),
*quick* calls (indexed statements: microseconds without the fsync) submitted from the event
loop that first used it run **on that loop's thread**, and only the group's COMMIT (the fsync)
is handed to the worker: one hop there and one back per group, not per call. The loop never
waits: it tries the write lock without waiting (the connection's ``busy_timeout`` is 0 on the
loop's path) and on ``SQLITE_BUSY`` — another process holds the file's write lock: a second
``--workers`` process, the CLI, another replica — hands the call, and every call after it in
that group, to the worker, which waits for the lock up to ``busy_timeout`` as before. Calls
arriving while the worker has the connection (its COMMIT under way) wait on the loop and run
there as the next group once it is back. Other calls (scans, opening and closing, calls from
another loop) run on the worker as before. The connection is shared by the two threads, and
used by one at a time: whoever *owns* it (the loop, from its group's first statement until the
worker's COMMIT of that group returned; or the worker) is the only one touching it.

A call that reads only and comes before any write of its group runs outside the transaction
(and is answered at once); after a write it runs inside it, so it waits for that COMMIT like the
writers (it may have seen their uncommitted rows). Calls that must not share a transaction
(opening, migrating, closing the connection) are submitted ``alone``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from paygate.errors import PaygateError

#: Calls per group at most: bounds how long the write lock is held and what one failed COMMIT
#: can take down.
MAX_GROUP = 64

#: Seconds the idle worker sleeps at most before it looks again, woken or not (every wait has
#: a timeout). Kept by :class:`_Ticker`, not by a timed wait: a timed sleep arms a kernel timer
#: each time the worker sleeps (measured: ~1.5 µs of CPU a sleep, i.e. a group, with
#: SimpleQueue.get(timeout=…) against get()), where the ticker's token costs one wake a second.
IDLE_WAIT = 1.0

#: Seconds :meth:`GroupCommit.stop` waits for the worker to finish what was queued.
STOP_TIMEOUT = 60.0

_SQLITE_BUSY = 5  # the primary result code; extended codes (BUSY_RECOVERY, …) share its low byte


@dataclass(slots=True, eq=False)
class _Call:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    alone: bool = False
    quick: bool = False  # may run on the event loop's thread (see the module doc)
    in_transaction: bool = False  # ran after its group's BEGIN: it waits for the COMMIT
    ok: bool = True
    outcome: Any = None


@dataclass(slots=True, eq=False)
class _Group:
    db: sqlite3.Connection | None = None  # set by the first write: BEGIN IMMEDIATE was run
    calls: list[_Call] = field(default_factory=list)
    on_loop: bool = False  # its statements run on the event loop (busy: hand over, never wait)
    handed: list[_Call] = field(default_factory=list)  # found the write lock busy: the worker's
    closed: bool = False  # takes no more calls (full, or a call queued behind it for the worker)


class _Transaction:
    """:meth:`GroupCommit.transaction`: a context manager written out (not a generator's: this
    is on every ledger call's path)."""

    __slots__ = ("_db", "_group", "_kind")

    def __init__(self, group: _Group | None, db: sqlite3.Connection) -> None:
        self._group = group
        self._db = db
        self._kind = 0  # 1: a plain transaction, 2: its group's BEGIN, 3: a savepoint

    def __enter__(self) -> sqlite3.Connection:
        db, group = self._db, self._group
        if group is None:  # not inside a group (cannot happen for submitted calls): plain
            db.execute("BEGIN IMMEDIATE")
            self._kind = 1
        elif group.db is None:  # this call begins the transaction: it is all its own so far
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if group.on_loop and _busy(exc):
                    raise WriteLockBusy from None
                raise
            group.db = db
            self._kind = 2
        else:
            # One savepoint at a time (each is released before the next call runs): one name.
            db.execute("SAVEPOINT call")
            self._kind = 3
        return db

    def __exit__(self, kind: type[BaseException] | None, error: object, tb: object) -> None:
        db = self._db
        if self._kind == 1:
            if kind is None:
                try:
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.execute("ROLLBACK")
                    raise
            elif db.in_transaction:
                db.execute("ROLLBACK")
        elif self._kind == 2:
            if kind is not None:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                assert self._group is not None
                self._group.db = None  # nothing left to commit
        elif kind is None:
            db.execute("RELEASE call")
        elif db.in_transaction:  # else SQLite already rolled the whole transaction back
            db.execute("ROLLBACK TO call")
            db.execute("RELEASE call")


class WriteLockBusy(PaygateError):
    """On the loop's path: another connection holds the write lock (never waited for there; the
    call goes to the worker, which waits). Never reaches a caller."""

    code = "ledger_write_lock_busy"
    message = "another process holds the ledger's write lock"


class GroupCommit:
    """Runs ledger calls in groups that share a COMMIT (see module doc).

    ``lost`` builds the error a call gets when its group's transaction is lost (COMMIT failed,
    or SQLite rolled it back under a later call). ``connection`` (the store's connection, None
    while closed) turns on the loop's path; ``busy_timeout`` (seconds) is then what the worker
    waits for the write lock. ``before_commit(n)`` and ``after_commit(n)``, if set, are called on
    the worker thread around each COMMIT of ``n`` calls (one fsync): for metrics and tests.
    """

    def __init__(
        self,
        name: str,
        lost: Callable[[sqlite3.Error], Exception],
        *,
        max_group: int = MAX_GROUP,
        after_commit: Callable[[int], None] | None = None,
        connection: Callable[[], sqlite3.Connection | None] | None = None,
        busy_timeout: float = 5.0,
    ) -> None:
        if max_group < 1:
            raise ValueError("max_group must be at least 1")
        self.max_group = max_group
        self.after_commit = after_commit
        self.before_commit: Callable[[int], None] | None = None
        self._lost = lost
        self._connection = connection
        self._busy_ms = int(busy_timeout * 1000)
        # Shared by the two threads, under _lock (held for microseconds, never across I/O).
        # The worker sleeps on _wake: one token put after each change it may be waiting for
        # (a plain lock and a C queue: no Condition's Python frames and per-wait lock, on the
        # loop's side of every group's hand-off). A token too many only makes it look again.
        self._lock = threading.Lock()
        self._wake: queue.SimpleQueue[None] = queue.SimpleQueue()
        self._owner: str | None = None  # "loop" | "worker": who may use the connection
        self._queue: deque[_Call | None] = deque()  # the worker's calls (None: stop)
        self._commit: _Group | None = None  # a loop group whose COMMIT the worker owes
        self._kick = False  # the loop has calls waiting for the connection
        # The event loop's (only touched on its thread):
        self._home: asyncio.AbstractEventLoop | None = None
        self._open: _Group | None = None  # running statements here; its COMMIT not yet handed
        self._waiting: list[_Call] = []  # for the connection, in submission order
        # Whoever owns the connection:
        self._group: _Group | None = None  # the group whose call is running
        self._stopped = False
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        _TICKER.keep(self._wake)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], *args: Any, alone: bool = False, quick: bool = False
    ) -> asyncio.Future[Any]:
        """Run ``fn(*args)``; the future resolves after its COMMIT. ``quick``: it may run on
        the calling event loop's thread (indexed statements only: never a scan)."""
        if self._stopped:
            raise RuntimeError("the ledger's worker has stopped")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        call = _Call(fn, args, loop, future, alone, quick and not alone)
        if self._connection is None:
            self._to_worker([call])
            return future
        if self._home is None:
            self._home = loop
        if loop is not self._home:  # another loop: the worker serialises it with the rest
            self._to_worker([call])
        elif self._waiting or (self._open is not None and not self._joins(call)):
            self._waiting.append(call)
            if self._open is not None and not call.quick:
                self._open.closed = True  # nothing may overtake it
        elif self._open is not None:
            self._here(call)
        elif not call.quick:
            self._to_worker([call])
        elif self._take():
            self._start()
            self._here(call)
        else:
            self._waiting.append(call)
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Run what is queued, then end the thread (blocks until it has ended, at most
        ``timeout`` seconds, default :data:`STOP_TIMEOUT`: then RuntimeError).

        Called on the event loop's thread, it blocks the loop, which then cannot run the
        callbacks it has pending: an open group's hand-off of its COMMIT to the worker (who
        would wait for it for ever while this waits for the worker), and its calls waiting
        for the connection. So it hands them over itself, in submission order: the open
        group's COMMIT first, then its calls that found the write lock busy, then the waiting
        ones, all ahead of the stop. Every accepted call is run and committed (or fails with
        its error); the answers reach the loop's callers once it runs again."""
        if not self._stopped:
            self._stopped = True
            waiting: list[_Call] = []
            if self._home is not None and _running_loop() is self._home:
                waiting, self._waiting = self._waiting, []
                if self._open is not None:
                    self._hand_off()
            with self._lock:
                self._queue.extend(waiting)
                self._queue.append(None)
            self._wake.put(None)
        self._thread.join(STOP_TIMEOUT if timeout is None else timeout)
        if self._thread.is_alive():
            raise RuntimeError(f"the {self._thread.name} worker did not finish in time")

    def transaction(self, db: sqlite3.Connection) -> _Transaction:
        """One call's read-modify-write, all or nothing (a savepoint in its group's transaction,
        opened with ``BEGIN IMMEDIATE`` by the group's first write). Only while a call runs."""
        return _Transaction(self._group, db)

    # --- the event loop's path ------------------------------------------------------------------

    def _joins(self, call: _Call) -> bool:
        """May ``call`` run in the open group now?"""
        group = self._open
        assert group is not None
        return call.quick and not group.closed and len(group.calls) < self.max_group

    def _take(self) -> bool:
        """The connection for the loop, if nobody has it and the worker has nothing queued."""
        with self._lock:
            if self._owner is None and not self._queue:
                self._owner = "loop"
                return True
            self._kick = True  # tell the loop when it is free
            return False

    def _start(self) -> _Group:
        group = self._open = _Group(on_loop=True)
        assert self._home is not None
        self._home.call_soon(self._hand_off)
        return group

    def _here(self, call: _Call) -> None:
        """Run a quick call in the open group, on the loop's thread."""
        group = self._open
        assert group is not None
        if group.handed:  # the write lock was busy: the rest of the group goes to the worker
            group.handed.append(call)
            return
        group.calls.append(call)
        began = group.db is not None
        self._group = group
        try:
            call.outcome = call.fn(*call.args)
        except BaseException as exc:
            if _busy(exc):  # nothing of it is left (its savepoint or transaction rolled back)
                group.calls.pop()
                group.handed.append(call)
                return
            call.ok, call.outcome = False, exc
        finally:
            self._group = None
        call.in_transaction = began or group.db is not None
        if group.db is not None and not group.db.in_transaction:
            self._fail(group, sqlite3.OperationalError("transaction rolled back"))
            group.db = None
        if not call.in_transaction:  # read committed rows only (or failed alone): answer now
            group.calls.pop()
            _resolve([call])
        if len(group.calls) + len(group.handed) >= self.max_group:
            group.closed = True

    def _hand_off(self) -> None:
        """End of the loop iteration that opened the group: its COMMIT goes to the worker."""
        group, self._open = self._open, None
        if group is None:  # stop() handed it off already
            return
        with self._lock:
            if self._queue and self._queue[-1] is None:
                # Stopped from another thread meanwhile: the worker waits for this group (the
                # connection is the loop's), so its handed calls still go ahead of the stop.
                self._queue.pop()
                self._queue.extend(group.handed)
                self._queue.append(None)
            else:
                self._queue.extend(group.handed)
            if group.db is not None:
                self._commit = group
            else:
                self._owner = None
        self._wake.put(None)
        if group.db is None:  # nothing to commit: the failed and the lost are answered now
            _resolve(group.calls)
            self._resume()

    def _committed(self, group: _Group) -> None:
        """On the loop, once the worker's COMMIT of ``group`` returned (or failed)."""
        _resolve(group.calls)
        self._resume()

    def _resume(self) -> None:
        """The connection may be free: run the waiting calls (a new group), in order."""
        if not self._waiting or self._open is not None:
            return
        if self._stopped:  # closed meanwhile: nobody will run them
            calls, self._waiting = self._waiting, []
            for call in calls:
                call.ok, call.outcome = False, self._lost(sqlite3.OperationalError("closed"))
            _resolve(calls)
            return
        if not self._waiting[0].quick:
            calls, self._waiting = self._waiting, []
            self._to_worker(calls)
            return
        if not self._take():
            return
        calls, self._waiting = self._waiting, []
        group = self._start()
        for n, call in enumerate(calls):
            if not self._joins(call):
                self._waiting = calls[n:]
                group.closed = True
                break
            self._here(call)

    def _to_worker(self, calls: list[_Call]) -> None:
        with self._lock:
            self._queue.extend(calls)
        self._wake.put(None)

    # --- the worker thread --------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            calls: list[_Call] = []
            with self._lock:
                group, self._commit = self._commit, None
                if group is None and self._queue and self._owner is None:
                    first = self._queue.popleft()
                    if first is None:
                        _TICKER.forget(self._wake)
                        return
                    calls.append(first)
                    while not first.alone and self._queue and len(calls) < self.max_group:
                        more = self._queue[0]
                        if more is None or more.alone:
                            break
                        calls.append(self._queue.popleft())
                    self._owner = "worker"
            if group is not None:
                self._finish(group)
            elif calls:
                self._run(calls)
            else:  # nothing for it yet: sleep until the loop changes something (or a tick)
                self._wake.get()
                continue
            with self._lock:
                self._owner = None
                kick, self._kick = self._kick, False
            if group is not None or kick:
                self._post(group)

    def _post(self, group: _Group | None) -> None:
        """Tell the loop the connection is free (and answer ``group``, committed)."""
        if self._home is None:
            return
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting
            if group is None:
                self._home.call_soon_threadsafe(self._resume)
            else:
                self._home.call_soon_threadsafe(self._committed, group)

    def _finish(self, group: _Group) -> None:
        """COMMIT a group whose statements ran on the loop (the connection is the loop's,
        lent to this thread until it returns)."""
        db = group.db
        assert db is not None
        if self.before_commit is not None:
            self.before_commit(len(group.calls))
        self._commit_group(group, db)

    def _commit_group(self, group: _Group, db: sqlite3.Connection) -> None:
        try:
            db.execute("COMMIT")
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if db.in_transaction:
                    db.execute("ROLLBACK")
            self._fail(group, exc)
        else:
            if self.after_commit is not None:
                self.after_commit(sum(1 for c in group.calls if c.in_transaction))

    def _run(self, calls: list[_Call]) -> None:
        group = self._group = _Group(calls=calls)
        self._timeout(self._busy_ms)  # the worker may wait for another process's write lock
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
                    group.db = None
            if group.db is not None:
                if self.before_commit is not None:
                    self.before_commit(sum(1 for c in calls if c.in_transaction))
                self._commit_group(group, group.db)
        finally:
            self._group = None
            self._timeout(0)  # back to the loop's path: never wait there
            self._answer(calls)

    def _timeout(self, ms: int) -> None:
        db = self._connection() if self._connection is not None else None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.execute(f"PRAGMA busy_timeout = {ms}")

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


class _Ticker:
    """The idle workers' timeout: one thread for the process puts a wake token into every
    worker's queue each :data:`IDLE_WAIT` seconds, so no worker sleeps longer unwoken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wakes: set[queue.SimpleQueue[None]] = set()
        self._thread: threading.Thread | None = None

    def keep(self, wake: queue.SimpleQueue[None]) -> None:
        with self._lock:
            self._wakes.add(wake)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._tick, name="paygate-commit-ticker", daemon=True
                )
                self._thread.start()

    def forget(self, wake: queue.SimpleQueue[None]) -> None:
        with self._lock:
            self._wakes.discard(wake)

    def _tick(self) -> None:
        while True:
            time.sleep(IDLE_WAIT)
            with self._lock:
                wakes = list(self._wakes)
            for wake in wakes:
                wake.put(None)


_TICKER = _Ticker()
# A forked child has none of the parent's threads: its group commits start their own ticker.
os.register_at_fork(after_in_child=_TICKER.__init__)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # not on an event loop's thread
        return None


def _busy(exc: BaseException) -> bool:
    """``SQLITE_BUSY`` (another connection has the lock), however the store wrapped it."""
    seen: BaseException | None = exc
    for _ in range(4):
        if seen is None:
            return False
        if isinstance(seen, WriteLockBusy):
            return True
        if isinstance(seen, sqlite3.OperationalError):
            return (getattr(seen, "sqlite_errorcode", 0) & 0xFF) == _SQLITE_BUSY
        seen = seen.__cause__ or seen.__context__
    return False


def _resolve(calls: list[_Call]) -> None:
    """On the callers' loop: one callback answers every call of a group."""
    for call in calls:
        if call.future.done():  # cancelled: the change is done all the same; nobody hears
            continue
        if call.ok:
            call.future.set_result(call.outcome)
        else:
            call.future.set_exception(call.outcome)
