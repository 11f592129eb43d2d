"""Run a coroutine to its end even if the task awaiting it is cancelled, without a task when
it never has to wait.

``await asyncio.shield(coro)`` makes a task for every call. A request's exit
(``PaymentSession.finish``) usually has nothing to wait for: then :func:`to_the_end` runs it
right here, and no cancellation can reach it (nothing is awaited: the task cannot be
interrupted between two statements). Only if it does wait does the rest go into a task, under
``asyncio.shield``, exactly as before: a cancellation of the caller then leaves it running."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")


async def to_the_end(coro: Coroutine[Any, Any, T]) -> T:
    """``await coro``, run to its end whatever happens to the awaiting task."""
    try:
        waits_for = coro.send(None)  # up to its first wait, synchronously: not cancellable
    except StopIteration as done:
        result: T = done.value
        return result
    except BaseException:
        coro.close()
        raise
    return await asyncio.shield(_rest(coro, waits_for))


@types.coroutine
def _rest(coro: Coroutine[Any, Any, T], waits_for: Any) -> Generator[Any, Any, T]:
    """The rest of ``coro``, which is waiting for ``waits_for`` (what its last step yielded to
    the event loop): a task driving this drives ``coro`` as if it had run it from the start."""
    while True:
        try:
            sent = yield waits_for
        except BaseException as exc:  # thrown in by the task (its future failed, cancelled)
            try:
                waits_for = coro.throw(exc)
            except StopIteration as done:
                result: T = done.value
                return result
        else:
            try:
                waits_for = coro.send(sent)
            except StopIteration as done:
                result = done.value
                return result
