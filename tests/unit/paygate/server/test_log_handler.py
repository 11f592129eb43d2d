"""The access log's deferred handler: lines of one loop iteration go out after it, in one write,
in order; nothing waits past a warning, another thread, a stopped loop or the exit flush."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Iterator

import pytest

from paygate.server.logs import DeferredStreamHandler


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


Logged = tuple[logging.Logger, CountingStream, DeferredStreamHandler]


@pytest.fixture
def logged() -> Iterator[Logged]:
    stream = CountingStream()
    handler = DeferredStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("test.deferred")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield logger, stream, handler
    finally:
        logger.removeHandler(handler)


def test_lines_of_one_iteration_are_written_after_it_in_one_write(logged: Logged) -> None:
    logger, stream, _ = logged

    async def main() -> str:
        logger.info("one")
        logger.info("two")
        seen = stream.getvalue()  # nothing yet: the reply goes out before the log line
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return seen

    assert asyncio.run(main()) == ""
    assert stream.getvalue() == "INFO one\nINFO two\n"
    assert stream.writes == 1


def test_a_warning_goes_out_at_once_after_what_waits(logged: Logged) -> None:
    logger, stream, _ = logged

    async def main() -> None:
        logger.info("first")
        logger.warning("second")
        assert stream.getvalue() == "INFO first\nWARNING second\n"

    asyncio.run(main())


def test_another_thread_writes_at_once_and_in_order(logged: Logged) -> None:
    logger, stream, _ = logged

    async def main() -> None:
        logger.info("on the loop")
        thread = threading.Thread(target=logger.info, args=("from a thread",))
        thread.start()
        thread.join(5)
        assert stream.getvalue() == "INFO on the loop\nINFO from a thread\n"

    asyncio.run(main())


def test_a_stopped_loop_strands_nothing(logged: Logged) -> None:
    logger, stream, handler = logged
    loop = asyncio.new_event_loop()
    # Logged in the loop's last iteration: the write it schedules never runs on this loop.
    loop.call_soon(logger.info, "scheduled, then the loop stops")
    loop.call_soon(loop.stop)
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""

    async def next_loop() -> None:
        logger.info("on the next loop")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    asyncio.run(next_loop())
    assert stream.getvalue() == "INFO scheduled, then the loop stops\nINFO on the next loop\n"
    handler.flush()


def test_the_exit_flush_writes_what_waits(logged: Logged) -> None:
    logger, stream, handler = logged

    async def main() -> None:
        logger.info("last words")
        handler.flush()  # logging.shutdown() calls this; workers call it before os._exit
        assert stream.getvalue() == "INFO last words\n"

    asyncio.run(main())


def test_the_wait_is_bounded(logged: Logged) -> None:
    logger, stream, _ = logged

    async def main() -> None:
        for i in range(DeferredStreamHandler.MAX_DEFERRED):
            logger.info("line %d", i)
        assert stream.getvalue().count("\n") == DeferredStreamHandler.MAX_DEFERRED

    asyncio.run(main())
