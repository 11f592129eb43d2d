"""to_the_end: a request's exit runs to its end even if its task is cancelled, and makes no
task when it has nothing to wait for."""

from __future__ import annotations

import asyncio

import pytest

from paygate.x402.to_the_end import to_the_end


async def test_a_coroutine_that_never_waits_runs_here_without_a_task() -> None:
    seen: list[set[asyncio.Task[object]]] = []

    async def quick() -> int:
        seen.append(asyncio.all_tasks())
        return 7

    before = asyncio.all_tasks()
    assert await to_the_end(quick()) == 7
    assert seen == [before]  # ran in the caller's task: no task was made for it


async def test_a_cancelled_caller_leaves_the_rest_running_to_its_end() -> None:
    gate = asyncio.Event()
    steps: list[str] = []

    async def exit_work() -> None:
        steps.append("before")
        await gate.wait()  # the ledger's COMMIT, say
        await asyncio.sleep(0)
        steps.append("after")

    caller = asyncio.create_task(to_the_end(exit_work()))
    await asyncio.sleep(0)
    assert steps == ["before"]
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(3):  # cancelled again and again: still nothing cut short
        await asyncio.sleep(0)
    assert steps == ["before"]
    gate.set()
    async with asyncio.timeout(5):
        while steps != ["before", "after"]:
            await asyncio.sleep(0)


async def test_results_and_errors_come_back_after_a_wait() -> None:
    loop = asyncio.get_running_loop()

    async def answer(future: asyncio.Future[int]) -> int:
        return await future + 1

    future: asyncio.Future[int] = loop.create_future()
    loop.call_soon(future.set_result, 41)
    assert await to_the_end(answer(future)) == 42

    async def handles(future: asyncio.Future[int]) -> str:
        try:
            await future
        except KeyError:  # thrown into it by the task: handled inside, as under a plain await
            return "handled"
        return "not thrown"

    failing: asyncio.Future[int] = loop.create_future()
    loop.call_soon(failing.set_exception, KeyError("x"))
    assert await to_the_end(handles(failing)) == "handled"

    failing = loop.create_future()
    loop.call_soon(failing.set_exception, ValueError("late"))
    with pytest.raises(ValueError, match="late"):
        await to_the_end(answer(failing))


async def test_an_error_before_any_wait_is_raised_at_once() -> None:
    async def broken() -> None:
        raise RuntimeError("early")

    with pytest.raises(RuntimeError, match="early"):
        await to_the_end(broken())
