"""A call from the event loop to a SQLite store's worker thread (:class:`GroupCommit`), the same
for the ledger and the transparency log: answered after its group's COMMIT, and run to its end
even if the awaiting task is cancelled (a cancelled caller does not know the outcome, but the
store is never half-done)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from paygate.x402.ledger_commit import GroupCommit

T = TypeVar("T")


async def worker_call(
    commits: GroupCommit,
    closed: Callable[[], Exception],
    fn: Callable[..., T],
    /,
    *args: Any,
    alone: bool = False,
    quick: bool = False,
) -> T:
    """``fn(*args)`` in the store's group (``quick``: its statements may run on the event loop's
    thread, only the COMMIT on the worker); ``closed()`` is raised once the worker has
    stopped."""
    try:
        future = commits.submit(fn, *args, alone=alone, quick=quick)
    except RuntimeError:  # the worker stopped
        raise closed() from None
    # Awaited directly, not through asyncio.shield: cancelling the caller cancels this future,
    # which only means nobody hears the outcome (GroupCommit runs the call all the same and
    # skips answering a future that is done).
    result: T = await future
    return result
