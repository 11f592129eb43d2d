"""A call from the event loop to a SQLite store's worker thread (:class:`GroupCommit`), the same
for the ledger and the transparency log: answered after its group's COMMIT, and run to its end
even if the awaiting task is cancelled (a cancelled caller does not know the outcome, but the
store is never half-done)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from paygate.x402.ledger_commit import GroupCommit

T = TypeVar("T")


def worker_call(
    commits: GroupCommit,
    closed: Callable[[], Exception],
    fn: Callable[..., T],
    /,
    *args: Any,
    alone: bool = False,
    quick: bool = False,
) -> asyncio.Future[T]:
    """``fn(*args)`` in the store's group (``quick``: its statements may run on the event loop's
    thread, only the COMMIT on the worker), to await; ``closed()`` is raised once the worker has
    stopped. A future, not a coroutine: one frame less on every ledger call.

    Awaited directly, not through asyncio.shield: cancelling the caller cancels this future,
    which only means nobody hears the outcome (GroupCommit runs every submitted call all the
    same, and skips answering a future that is done)."""
    try:
        return commits.submit(fn, *args, alone=alone, quick=quick)
    except RuntimeError:  # the worker stopped
        raise closed() from None
