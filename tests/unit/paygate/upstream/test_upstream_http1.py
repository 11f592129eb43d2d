"""The forwarding path's HTTP/1.1 client (paygate.upstream.http1) against raw servers on real
loopback sockets, under asyncio's loop and uvloop: pooling, early exits, malformed and hostile
replies, decoding, bounds, deadlines, the unix socket."""

from __future__ import annotations

import asyncio
import gzip
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop

from paygate.upstream import http1, relay
from paygate.upstream.http1 import Endpoint, Pool
from tests.fixtures.upstream_support import unaccepting_listener

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[bool]]


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(15):
                return await scenario()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(bounded())

    return run


class Scripted:
    """A raw server: reads each request (head and Content-Length body) and lets ``answer``
    write whatever it likes; ``answer`` returns False to close the connection."""

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed_by_peer = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Scripted:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self.writers:
            writer.close()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed_by_peer.set()
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                self.requests.append(head + await reader.readexactly(length))
                if not await self._answer(reader, writer, len(self.requests) - 1):
                    break
                await writer.drain()
            await writer.drain()
        except ConnectionError:
            self.closed_by_peer.set()
        finally:
            writer.close()


def reply(data: bytes, keep: bool = True) -> Answer:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        writer.write(data)
        return keep

    return answer


async def get(pool: Pool, path: str = "/x", deadline: float = 5.0, **kw: Any) -> http1.Response:
    loop = asyncio.get_running_loop()
    return await pool.request(
        kw.get("method", "POST"),
        path,
        kw.get("headers", [("Accept", "*/*")]),
        kw.get("body", b"{}"),
        connect_timeout=kw.get("connect_timeout", 2.0),
        deadline=loop.time() + deadline,
    )


async def body_of(response: http1.Response) -> bytes:
    out = b""
    loop = asyncio.get_running_loop()
    while chunk := await response.read(loop.time() + 5):
        out += chunk
    return out


async def body_fails(answer: Answer) -> None:
    """The reply's head arrives, its body ends in a ProtocolError."""
    async with Scripted(answer) as server:
        pool = Pool(Endpoint.from_url(server.url), limit=4)
        response = await get(pool)
        with pytest.raises(http1.ProtocolError):
            await body_of(response)
        await pool.close()


def test_a_connection_is_reused_once_its_reply_was_read_to_its_end(run: Any) -> None:
    async def scenario() -> None:
        async with Scripted(reply(OK)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            for _ in range(3):
                response = await get(pool)
                assert response.status == 200
                assert await body_of(response) == b"{}"
                response.release()
            assert server.connections == 1
            first = server.requests[0]
            assert first.startswith(b"POST /x HTTP/1.1\r\nHost: 127.0.0.1:")
            assert b"\r\nContent-Length: 2\r\n\r\n{}" in first
            await pool.close()

    run(scenario)


def test_an_exchange_left_early_closes_its_connection(run: Any) -> None:
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"

    async def scenario() -> None:
        async with Scripted(reply(stream)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            response = await get(pool)
            assert response.read_nowait() == b"hello" or await body_of(response)
            response.close()  # the caller went away mid-stream
            async with asyncio.timeout(5):
                await server.closed_by_peer.wait()  # the model server sees the abort
            response.release()  # harmless after close
            await get(pool)
            assert server.connections == 2  # never reused
            await pool.close()

    run(scenario)


def test_a_reply_not_read_to_its_end_is_not_reused(run: Any) -> None:
    async def scenario() -> None:
        async with Scripted(reply(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")) as s:
            pool = Pool(Endpoint.from_url(s.url), limit=4)
            response = await get(pool)
            response.release()  # half a body: the rest would be read as the next reply
            async with asyncio.timeout(5):
                await s.closed_by_peer.wait()
            await pool.close()

    run(scenario)


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 2OO OK\r\n\r\n",  # not a status code
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",  # smuggling
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    ],
)
def test_a_malformed_or_unusable_reply_head_is_a_protocol_error(run: Any, data: bytes) -> None:
    async def scenario() -> None:
        async with Scripted(reply(data)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            with pytest.raises(http1.ProtocolError):
                await get(pool)
            await pool.close()

    run(scenario)


def test_a_reply_head_is_bounded(run: Any) -> None:
    huge = b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (http1.MAX_HEAD_BYTES + 10) + b"\r\n\r\n"
    many = b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * (http1.MAX_HEADERS + 1) + b"\r\n"

    async def scenario() -> None:
        for data in (huge, many):
            async with Scripted(reply(data)) as server:
                pool = Pool(Endpoint.from_url(server.url), limit=4)
                with pytest.raises(http1.ProtocolError):
                    await get(pool)
                await pool.close()

    run(scenario)


def test_an_endless_trailer_after_the_body_is_a_protocol_error(run: Any) -> None:
    """A chunked reply's trailer never ends: the parser would gather it in memory past every
    bound (the head's is over, the body's counts body bytes only). The bytes that are not body
    since the last body byte are bounded: the reply fails, it does not grow."""
    piece = b"a" * 16384

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        writer.write(b"0\r\nX-Trailer: ")
        try:
            for _ in range(4 * http1.MAX_HEAD_BYTES // len(piece)):
                writer.write(piece)
                await writer.drain()
            await reader.read()  # hold the trailer open: only the bound ends the reply
        except ConnectionError:
            pass
        return False

    run(lambda: body_fails(answer))


def test_a_body_cut_before_its_end_is_a_protocol_error(run: Any) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        return False  # closes without the last chunk

    run(lambda: body_fails(answer))


def test_a_body_without_length_ends_with_the_connection(run: Any) -> None:
    async def scenario() -> None:
        async with Scripted(reply(b"HTTP/1.1 200 OK\r\n\r\nall of it", keep=False)) as s:
            pool = Pool(Endpoint.from_url(s.url), limit=4)
            response = await get(pool)
            assert await body_of(response) == b"all of it"
            response.release()
            await get(pool)  # a fresh connection: that one is gone
            assert s.connections == 2
            await pool.close()

    run(scenario)


def test_gzip_and_deflate_are_decoded_in_bounded_pieces(run: Any) -> None:
    plain = b"0123456789abcdef" * 100_000  # 1.6 MB from a few KB: no buffer holds it whole
    bodies = {
        "gzip": gzip.compress(plain),
        "deflate": zlib.compress(plain),
    }
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    bodies["raw-deflate"] = raw.compress(plain) + raw.flush()

    async def scenario() -> None:
        for name, data in bodies.items():
            encoding = "deflate" if "deflate" in name else name
            head = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n"
            async with Scripted(reply(head % (encoding.encode(), len(data)) + data)) as s:
                pool = Pool(Endpoint.from_url(s.url), limit=4)
                response = await get(pool)
                assert not response.identity
                assert response.whole() is None  # only undecoded bodies are taken whole
                pieces = []
                loop = asyncio.get_running_loop()
                while piece := await response.read(loop.time() + 5):
                    assert len(piece) <= http1.READ_CHUNK
                    pieces.append(piece)
                assert b"".join(pieces) == plain, name
                response.release()
                await pool.close()

    run(scenario)


def test_a_corrupt_gzip_body_is_a_protocol_error(run: Any) -> None:
    data = b"\x1f\x8b\x08\x00garbage-garbage"
    head = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n" % len(data)

    run(lambda: body_fails(reply(head + data)))


def test_bytes_after_a_reply_poison_the_connection(run: Any) -> None:
    # A second, unrequested reply must never be read as the answer to the next request.
    async def scenario() -> None:
        async with Scripted(reply(OK + OK)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            response = await get(pool)
            assert await body_of(response) == b"{}"
            response.release()
            second = await get(pool)
            assert await body_of(second) == b"{}"
            assert server.connections == 2
            await pool.close()

    run(scenario)


def test_an_interim_reply_is_skipped(run: Any) -> None:
    async def scenario() -> None:
        async with Scripted(reply(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            response = await get(pool)
            assert response.status == 200
            assert await body_of(response) == b"{}"
            await pool.close()

    run(scenario)


def test_a_reused_connection_closed_before_any_reply_is_retried_once(run: Any) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        if i == 1:
            return False  # the keep-alive timer fired as the second request crossed it
        writer.write(OK)
        return True

    async def scenario() -> None:
        async with Scripted(answer) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            first = await get(pool)
            await body_of(first)
            first.release()
            second = await get(pool)
            assert await body_of(second) == b"{}"
            assert server.connections == 2
            assert len(server.requests) == 3
            await pool.close()

    run(scenario)


def test_a_new_connection_closed_before_any_reply_is_not_retried(run: Any) -> None:
    async def scenario() -> None:
        async with Scripted(reply(b"", keep=False)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            with pytest.raises(http1.ProtocolError):
                await get(pool)
            assert len(server.requests) == 1
            await pool.close()

    run(scenario)


@pytest.mark.parametrize(
    "headers", [[("X-A", "1\r\nX-Injected: 1")], [("X-A\r\nX-B", "1")], [("X-A", "1\nX-B: 2")]]
)
def test_cr_or_lf_inside_a_header_is_refused_before_sending(
    run: Any, headers: list[tuple[str, str]]
) -> None:
    async def scenario() -> None:
        async with Scripted(reply(OK)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            with pytest.raises(ValueError, match="CR or LF"):
                await get(pool, headers=headers)
            with pytest.raises(ValueError, match="CR or LF"):
                await get(pool, path="/x HTTP/1.1\r\nX-Injected: 1\r\n\r\nGET /y")
            assert server.requests == []
            await pool.close()

    run(scenario)


def test_refused_and_timed_out_connects_are_told_apart(run: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        import socket

        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            port = unused.getsockname()[1]
        pool = Pool(Endpoint.from_url(f"http://127.0.0.1:{port}"), limit=4)
        with pytest.raises(http1.ConnectFailed):
            await get(pool)
        nowhere = Endpoint.from_url("http://localhost", unix_path=str(tmp_path / "no"))
        missing = Pool(nowhere, limit=4)
        with pytest.raises(http1.ConnectFailed):
            await get(missing)
        with unaccepting_listener() as full:  # connections hang in SYN-SENT
            hanging = Pool(Endpoint.from_url(f"http://127.0.0.1:{full}"), limit=4)
            with pytest.raises(http1.ConnectTimeout):
                await get(hanging, connect_timeout=0.2)
            # The first-byte deadline, shorter than the connect clock, is a read timeout.
            with pytest.raises(http1.ReadTimeout):
                await get(hanging, connect_timeout=5, deadline=0.2)

    run(scenario)


def test_the_head_deadline_closes_the_connection(run: Any) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        await asyncio.sleep(30)
        return False

    async def scenario() -> None:
        async with Scripted(answer) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            with pytest.raises(http1.ReadTimeout):
                await get(pool, deadline=0.2)
            await pool.close()

    run(scenario)


def test_every_wait_keeps_its_own_deadline_under_the_shared_timer(run: Any) -> None:
    """The waits share one timer: a wait with an earlier deadline than those already waiting
    still expires at its own; the others keep waiting; a finished wait leaves nothing."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        if b"/slow" in server.requests[i]:
            await asyncio.sleep(30)
            return False
        writer.write(OK)
        return True

    async def scenario() -> None:
        nonlocal server
        async with Scripted(answer) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            late = asyncio.create_task(get(pool, "/slow", deadline=10.0))
            await asyncio.sleep(0.05)
            with pytest.raises(http1.ReadTimeout):
                await get(pool, "/slow", deadline=0.2)  # earlier than the one waiting
            assert not late.done()
            assert await body_of(await get(pool)) == b"{}"
            assert len(pool._deadlines) == 1  # only the late wait is left
            late.cancel()
            with pytest.raises(asyncio.CancelledError):
                await late
            assert len(pool._deadlines) == 0
            await pool.close()

    server: Scripted
    run(scenario)


def test_the_pool_bounds_its_connections(run: Any) -> None:
    async def scenario() -> None:
        async with Scripted(reply(OK)) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=1)
            held = await get(pool)
            with pytest.raises(http1.ConnectTimeout):
                await get(pool, connect_timeout=0.2)
            waiting = asyncio.create_task(get(pool))
            await asyncio.sleep(0.05)
            await body_of(held)
            held.release()  # its connection goes to the one waiting
            second = await waiting
            assert await body_of(second) == b"{}"
            assert server.connections == 1
            await pool.close()

    run(scenario)


def test_a_reader_that_stops_stops_the_sender(run: Any) -> None:
    chunk = b"x" * 65536
    sent = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, i: int) -> bool:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(512):  # 32 MiB
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()  # blocks once the client stops reading
            sent += len(chunk)
        writer.write(b"0\r\n\r\n")
        return True

    async def scenario() -> None:
        async with Scripted(answer) as server:
            pool = Pool(Endpoint.from_url(server.url), limit=4)
            response = await get(pool)
            await asyncio.sleep(0.5)
            assert sent < 16 * 1024 * 1024  # socket buffers, not the whole reply
            total = len(await body_of(response))
            assert total == 512 * len(chunk)
            response.release()
            await pool.close()

    run(scenario)


def test_the_relay_unix_socket(run: Any, tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Scripted(reply(OK)) as server:
            port = int(server.url.rsplit(":", 1)[1])
            path = tmp_path / "upstream.sock"
            task = asyncio.create_task(relay.serve(str(path), port))
            try:
                while not path.exists():
                    await asyncio.sleep(0.01)
                pool = Pool(Endpoint.from_url("http://localhost", unix_path=str(path)), limit=4)
                for _ in range(2):
                    response = await get(pool)
                    assert await body_of(response) == b"{}"
                    response.release()
                assert server.requests[0].startswith(b"POST /x HTTP/1.1\r\nHost: localhost\r\n")
                await pool.close()
            finally:
                task.cancel()

    run(scenario)
