"""The facilitator's HTTP/1.1 client (paygate.x402.facilitator_http) and the settler's use of it,
against raw servers on real loopback sockets under asyncio's loop and uvloop: keep-alive,
framing, bounds, deadlines, TLS, the stale-connection rule (a verification is resent, a
settlement never once it left), redirects and header injection."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import socketserver
import ssl
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import SecretStr

from paygate.x402 import facilitator_http
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.facilitator_auth import CdpJwt, StaticHeaders
from paygate.x402.facilitator_http import (
    AnswerTimeout,
    Broken,
    FacilitatorConnectTimeout,
    FacilitatorHttp,
    NotSent,
    TooLarge,
)
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable
from tests.fixtures.tls import make_ca
from tests.fixtures.upstream_support import unaccepting_listener
from tests.fixtures.x402_support import sdk_payment

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
VALID = json.dumps({"isValid": True, "payer": "0x" + "ab" * 20}).encode()
SETTLED = json.dumps(
    {"success": True, "transaction": "0x" + "cd" * 32, "network": "eip155:84532"}
).encode()


def ok(body: bytes = VALID, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


# What a scripted server does with one request: write an answer (or not); False closes.
Script = Callable[[asyncio.StreamWriter, int], Awaitable[bool]]


class Peer:
    """A raw HTTP server on loopback (TLS with ``tls``): reads each request and lets
    ``script`` answer however it likes."""

    def __init__(self, script: Script, tls: ssl.SSLContext | None = None) -> None:
        self._script = script
        self._tls = tls
        self.connections = 0
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Peer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"{'https' if self._tls else 'http'}://127.0.0.1:{self.port}"

    def heads(self) -> list[str]:
        return [r.split(b"\r\n\r\n")[0].decode() for r in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.requests.append(head + await reader.readexactly(length))
                if not await self._script(writer, len(self.requests) - 1):
                    break
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


def answer(data: bytes, keep: bool = True) -> Script:
    async def script(writer: asyncio.StreamWriter, index: int) -> bool:
        writer.write(data)
        return keep

    return script


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
        async def bounded() -> Any:
            async with asyncio.timeout(20):
                return await scenario()

        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(bounded())

    return run


async def call(
    client: FacilitatorHttp,
    *,
    path: str = "/verify",
    headers: dict[str, str] | None = None,
    body: bytes = b'{"x":1}',
    timeout: float = 5.0,
    connect_timeout: float = 2.0,
    read_only: bool = True,
) -> facilitator_http.Answer:
    return await client.call(
        "POST",
        path,
        headers or {},
        body,
        timeout=timeout,
        connect_timeout=connect_timeout,
        resend_stale=read_only,
    )


async def until(check: Callable[[], bool]) -> None:
    for _ in range(500):  # bounded: 5 s
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("never happened")


# --- the exchange ---


def test_calls_share_one_keep_alive_connection(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            client = FacilitatorHttp(peer.url)
            for _ in range(3):
                got = await call(client, headers={"X-Api-Key": "k1"})
                assert (got.status, got.body) == (200, VALID)
            assert peer.connections == 1
            head = peer.heads()[0].split("\r\n")
            assert head[0] == "POST /verify HTTP/1.1"
            assert f"Host: 127.0.0.1:{peer.port}" in head
            assert "Content-Type: application/json" in head
            assert "Content-Length: 7" in head
            assert "X-Api-Key: k1" in head
            assert peer.requests[0].endswith(b'\r\n\r\n{"x":1}')
            await client.close()
            await until(lambda: client.open_connections == 0)

    run(scenario)


def test_the_url_path_and_its_credentials_are_kept(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            client = FacilitatorHttp(f"http://op:p%40ss@127.0.0.1:{peer.port}/x402/")
            await call(client)
            head = peer.heads()[0].split("\r\n")
            assert head[0] == "POST /x402/verify HTTP/1.1"
            assert f"Authorization: Basic {base64.b64encode(b'op:p@ss').decode()}" in head

    run(scenario)


@pytest.mark.parametrize(
    "wire",
    [
        # chunked, in small chunks
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(
            b"%x\r\n%s\r\n" % (len(VALID[i : i + 5]), VALID[i : i + 5])
            for i in range(0, len(VALID), 5)
        )
        + b"0\r\n\r\n",
        # no length, not chunked: the body ends with the connection
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + VALID,
        # gzip
        ok(gzip.compress(VALID), b"Content-Encoding: gzip\r\n"),
        # an interim 100 Continue before the answer
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(),
    ],
    ids=["chunked", "unframed", "gzip", "interim"],
)
def test_every_framing_gives_the_whole_answer(run: Any, wire: bytes) -> None:
    async def scenario() -> None:
        keep = b"Connection: close" not in wire
        async with Peer(answer(wire, keep=keep)) as peer:
            client = FacilitatorHttp(peer.url)
            for _ in range(2):
                got = await call(client)
                assert (got.status, got.body) == (200, VALID)
            assert peer.connections == (1 if keep else 2)

    run(scenario)


def test_a_redirect_is_an_answer_never_followed(run: Any) -> None:
    async def scenario() -> None:
        moved = b"HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n"
        async with Peer(answer(moved)) as peer:
            client = FacilitatorHttp(peer.url)
            got = await call(client)
            assert (got.status, got.body) == (302, b"")
            assert len(peer.requests) == 1
            assert "/elsewhere" not in peer.heads()[0]

    run(scenario)


# --- bounds ---


async def _endless(writer: asyncio.StreamWriter, head: bytes, piece: bytes) -> bool:
    writer.write(head)
    for _ in range(2000):  # 64 MiB at most: far past every bound
        writer.write(piece)
        await writer.drain()
    return False


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (
            lambda w, i: _endless(
                w, b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n", b"x" * 32768
            ),
            TooLarge,
        ),
        (
            lambda w, i: _endless(
                w,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"8000\r\n" + b"x" * 32768 + b"\r\n",
            ),
            TooLarge,
        ),
        (
            lambda w, i: _endless(w, b"HTTP/1.1 200 OK\r\n", b"X-Pad: " + b"y" * 4000 + b"\r\n"),
            Broken,
        ),
        (
            lambda w, i: _endless(
                w,
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\nX-T: ",
                b"z" * 32768,
            ),
            TooLarge,
        ),
        (lambda w, i: _endless(w, b"", b"HTTP/1.1 100 Continue\r\n\r\n" * 1024), TooLarge),
        (
            answer(ok(gzip.compress(b" " * (8 * 1024 * 1024)), b"Content-Encoding: gzip\r\n")),
            TooLarge,
        ),
        (answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", keep=False), Broken),
        (answer(b"NOT HTTP AT ALL\r\n\r\n"), Broken),
    ],
    ids=[
        "huge-length",
        "huge-chunked",
        "endless-head",
        "endless-trailer",
        "endless-interim",
        "gzip-bomb",
        "cut-short",
        "not-http",
    ],
)
def test_oversized_or_broken_answers_fail_and_the_connection_is_dropped(
    run: Any, script: Script, error: type[Exception]
) -> None:
    async def scenario() -> None:
        async with Peer(script) as peer:
            client = FacilitatorHttp(peer.url)
            with pytest.raises(error):
                await call(client)
            await until(lambda: client.open_connections == 0)

    run(scenario)


async def _drip(writer: asyncio.StreamWriter, index: int) -> bool:
    for byte in ok():
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)
    return True


async def _silent(writer: asyncio.StreamWriter, index: int) -> bool:
    await asyncio.sleep(30)
    return False


@pytest.mark.parametrize("script", [_drip, _silent], ids=["byte-by-byte", "never"])
def test_the_total_deadline_bounds_slow_and_silent_answers(run: Any, script: Script) -> None:
    async def scenario() -> None:
        async with Peer(script) as peer:
            client = FacilitatorHttp(peer.url)
            with pytest.raises(AnswerTimeout):
                await call(client, timeout=0.5)
            assert isinstance(AnswerTimeout(), TimeoutError)
            await until(lambda: client.open_connections == 0)

    run(scenario)


def test_a_connection_that_never_opens_is_a_connect_timeout(run: Any) -> None:
    async def scenario() -> None:
        with unaccepting_listener() as port:
            client = FacilitatorHttp(f"http://127.0.0.1:{port}")
            with pytest.raises(FacilitatorConnectTimeout):
                await call(client, timeout=5.0, connect_timeout=0.3)
            assert client.open_connections == 0

    run(scenario)


def test_a_connect_cut_by_the_call_deadline_was_not_sent(run: Any) -> None:
    # The call's own deadline (not the connect clock) ends the connect: still nothing left.
    async def scenario() -> None:
        with unaccepting_listener() as port:
            client = FacilitatorHttp(f"http://127.0.0.1:{port}")
            with pytest.raises(FacilitatorConnectTimeout) as caught:
                await call(client, timeout=0.3, connect_timeout=5.0, read_only=False)
            assert isinstance(caught.value, NotSent)
            assert isinstance(caught.value, TimeoutError)
            assert client.open_connections == 0

    run(scenario)


def test_a_call_cancelled_as_its_connection_opens_counts_it_gone_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The caller goes away (its task cancelled; a connect timeout is the same) after the
    # socket connected but before create_connection returned: asyncio closes that transport,
    # whose end reaches the connection. The pool must count it gone once, not twice (the
    # limit would then let one more open for every such call).
    class CancelledOpening(facilitator_http._FacilitatorConnection):
        def __init__(self, *args: Any) -> None:
            super().__init__(*args)
            asyncio.get_running_loop().call_soon(task.cancel)  # before connection_made

    async def scenario() -> None:
        nonlocal task
        async with Peer(answer(ok())) as peer:
            client = FacilitatorHttp(peer.url)
            with monkeypatch.context() as patch:
                patch.setattr(facilitator_http, "_FacilitatorConnection", CancelledOpening)
                task = asyncio.ensure_future(call(client))
                with pytest.raises(asyncio.CancelledError):
                    await task
            for _ in range(5):  # the transport's end arrives on later turns of the loop
                await asyncio.sleep(0)
            assert client.open_connections == 0
            assert (await call(client)).status == 200
            assert client.open_connections == 1

    task: asyncio.Future[Any] = None  # type: ignore[assignment]
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        runner.run(scenario())


def test_a_refused_connection_is_not_sent(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            url = peer.url
        client = FacilitatorHttp(url)  # the server is gone
        with pytest.raises(NotSent):
            await call(client)
        assert client.open_connections == 0

    run(scenario)


def test_the_pool_limit_queues_calls_on_the_open_connection(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            client = FacilitatorHttp(peer.url, connections=1)
            got = await asyncio.gather(*(call(client) for _ in range(4)))
            assert [a.status for a in got] == [200] * 4
            assert peer.connections == 1

    run(scenario)


def test_a_call_that_never_gets_a_connection_was_not_sent(run: Any) -> None:
    """Every connection busy until the deadline: the call fails as not sent (a settlement is
    unavailable, not of unknown outcome), and the facilitator saw nothing of it."""
    held = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter, index: int) -> bool:
        await held.wait()  # the first call holds the one connection
        writer.write(ok())
        return True

    async def scenario() -> None:
        async with Peer(slow) as peer:
            client = FacilitatorHttp(peer.url, connections=1)
            first = asyncio.ensure_future(call(client, timeout=10))
            while not peer.requests:
                await asyncio.sleep(0.01)
            with pytest.raises(facilitator_http.PoolBusy) as caught:
                await call(client, path="/settle", read_only=False, timeout=0.3)
            assert isinstance(caught.value, NotSent)
            assert len(peer.requests) == 1  # the second never left
            held.set()
            assert (await first).status == 200
            await client.close()

    run(scenario)


def test_close_refuses_a_call_waiting_for_a_connection_at_once(run: Any) -> None:
    held = asyncio.Event()

    async def slow(writer: asyncio.StreamWriter, index: int) -> bool:
        await held.wait()
        writer.write(ok())
        return True

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with Peer(slow) as peer:
            client = FacilitatorHttp(peer.url, connections=1)
            first = asyncio.ensure_future(call(client, timeout=10))
            while not peer.requests:
                await asyncio.sleep(0.01)
            waiting = asyncio.ensure_future(call(client, timeout=10))
            await asyncio.sleep(0.05)
            started = loop.time()
            await client.close()
            with pytest.raises(NotSent):
                await waiting
            assert loop.time() - started < 5  # woken by close, not by its 10 s deadline
            assert len(peer.requests) == 1
            held.set()
            await first

    run(scenario)


# --- TLS ---


def test_https_is_verified_against_the_trust_store(
    run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = make_ca(tmp_path / "ca")
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(ca.cert_file, ca.key_file)

    async def scenario() -> None:
        async with Peer(answer(ok()), tls=server_tls) as peer:
            untrusting = FacilitatorHttp(peer.url)
            with pytest.raises(NotSent):  # a certificate nobody vouches for: nothing sent
                await call(untrusting)
            assert peer.requests == []
            monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
            client = FacilitatorHttp(peer.url)
            for _ in range(2):
                got = await call(client)
                assert (got.status, got.body) == (200, VALID)
            assert len(peer.requests) == 2
            await client.close()

    run(scenario)


def test_a_tls_handshake_that_never_ends_is_a_connect_timeout(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:  # plain TCP: never answers a ClientHello
            client = FacilitatorHttp(f"https://127.0.0.1:{peer.port}")
            with pytest.raises(FacilitatorConnectTimeout):
                await call(client, timeout=5.0, connect_timeout=0.3)

    run(scenario)


# --- connections the facilitator closes ---


def test_a_connection_closed_while_idle_is_never_used(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok(), keep=False)) as peer:  # answers keep-alive, then closes
            client = FacilitatorHttp(peer.url)
            for read_only in (True, False, True):
                got = await call(client, read_only=read_only)
                assert got.status == 200
                await until(lambda: client.open_connections == 0)
            assert peer.connections == 3
            assert len(peer.requests) == 3

    run(scenario)


async def _close_the_second_unanswered(writer: asyncio.StreamWriter, index: int) -> bool:
    if index == 1:
        return False  # read it, then close without a byte: what a server's idle timer does
    writer.write(ok())
    return True


def test_a_stale_connection_resends_a_verification_once(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(_close_the_second_unanswered) as peer:
            client = FacilitatorHttp(peer.url)
            await call(client)
            got = await call(client, read_only=True)
            assert got.status == 200
            assert len(peer.requests) == 3  # the lost one and its resend
            assert peer.connections == 2

    run(scenario)


def test_a_stale_connection_never_resends_a_settlement(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(_close_the_second_unanswered) as peer:
            client = FacilitatorHttp(peer.url)
            await call(client, path="/settle", read_only=False)
            with pytest.raises(Broken):
                await call(client, path="/settle", read_only=False)
            assert len(peer.requests) == 2  # sent once: its outcome is unknown, not retried
            assert peer.connections == 1

    run(scenario)


def test_a_settlement_rides_only_a_recently_used_connection(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(facilitator_http, "SETTLE_IDLE", 0.0)  # every idle one is too old

    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            client = FacilitatorHttp(peer.url)
            await call(client)
            await call(client, read_only=True)
            assert peer.connections == 1  # verifications reuse it
            await call(client, path="/settle", read_only=False)
            assert peer.connections == 2  # a settlement opened its own

    run(scenario)


def test_a_settlement_on_a_full_pool_of_old_connections_makes_room(
    run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every open connection is idle but too old for a settlement: it must not wait out its
    # deadline (a timeout: an "unknown" outcome for a settlement that never left).
    monkeypatch.setattr(facilitator_http, "SETTLE_IDLE", 0.0)

    async def scenario() -> None:
        async with Peer(answer(ok(SETTLED))) as peer:
            client = FacilitatorHttp(peer.url, connections=1)
            await call(client)
            got = await call(client, path="/settle", read_only=False, timeout=2.0)
            assert (got.status, got.body) == (200, SETTLED)
            assert peer.connections == 2  # the old one closed, a new one opened
            assert client.open_connections == 1  # the limit holds
            await client.close()
            await until(lambda: client.open_connections == 0)

    run(scenario)


def test_bytes_nobody_asked_for_drop_the_connection(run: Any) -> None:
    async def scenario() -> None:
        async def chatty(writer: asyncio.StreamWriter, index: int) -> bool:
            writer.write(ok() + b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            return True

        async with Peer(chatty) as peer:
            client = FacilitatorHttp(peer.url)
            for _ in range(2):
                got = await call(client)
                assert (got.status, got.body) == (200, VALID)
            assert peer.connections == 2

    run(scenario)


# --- headers ---


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Api-Key": "k\r\nX-Evil: 1"},
        {"X-Api-Key": "k\nX-Evil: 1"},
        {"X-Api-Key": "k\x00"},
        {"X-Api-Key\r\nX-Evil": "1"},
        {"X Api": "1"},
        {"X-Api:": "1"},
        {"": "1"},
        {"Content-Length": "0"},
        {"Transfer-Encoding": "chunked"},
        {"Host": "elsewhere.example"},
        {"X-Api-Key": "k\u2028"},
    ],
)
def test_a_header_that_would_rewrite_the_request_is_never_sent(
    run: Any, headers: dict[str, str]
) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            client = FacilitatorHttp(peer.url)
            with pytest.raises(NotSent):
                await call(client, headers=headers)
            assert peer.connections == 0

    run(scenario)


# --- the settler over it: the errors and codes callers see ---


def _settler(url: str, **kw: Any) -> FacilitatorSettler:
    return FacilitatorSettler(None, url, timeout=1.0, settle_timeout=1.0, backoff=0.01, **kw)  # type: ignore[arg-type]


async def _verify(settler: FacilitatorSettler) -> Any:
    payment = sdk_payment(2)
    return await settler.verify(payment, payment.accepted.wire())


def test_verify_and_settle_read_their_answers(run: Any) -> None:
    async def scenario() -> None:
        async def both(writer: asyncio.StreamWriter, index: int) -> bool:
            writer.write(ok(SETTLED if index else VALID))
            return True

        async with Peer(both) as peer:
            settler = _settler(peer.url)
            assert (await _verify(settler)).is_valid is True
            settled = await settler.settle_body({"x402Version": 2})
            assert settled.success is True
            assert peer.connections == 1
            assert json.loads(peer.requests[0].split(b"\r\n\r\n", 1)[1])["x402Version"] == 2
            await settler.close()

    run(scenario)


@pytest.mark.parametrize("version", [1, 2])
def test_verify_and_settle_send_the_x402_request_document(run: Any, version: int) -> None:
    # The body is the document's compact JSON byte for byte, the payment's part made once.
    async def scenario() -> None:
        async def by_path(writer: asyncio.StreamWriter, index: int) -> bool:
            verify = peer.requests[index].startswith(b"POST /verify ")
            writer.write(ok(VALID if verify else SETTLED))
            return True

        async with Peer(by_path) as peer:
            settler = _settler(peer.url)
            payment = sdk_payment(version)
            requirements = {"scheme": "exact", "n": 2**70, "s": "r\u00e9seau"}
            document = {
                "x402Version": version,
                "paymentPayload": payment.wire(),
                "paymentRequirements": requirements,
            }
            assert (await settler.verify(payment, requirements)).is_valid is True
            assert (await settler.send(payment, requirements)).success is True
            bodies = [r.split(b"\r\n\r\n", 1)[1] for r in peer.requests]
            assert [json.loads(b) for b in bodies] == [document, document]
            assert bodies[0] == bodies[1]
            assert bodies[0].startswith(b'{"x402Version":%d,"paymentPayload":{' % version)
            await settler.close()

    run(scenario)


@pytest.mark.parametrize(
    ("script", "verify_sends"),
    [
        (answer(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"), 2),
        (answer(b"HTTP/1.1 302 Found\r\nLocation: /v2/verify\r\nContent-Length: 0\r\n\r\n"), 2),
        (answer(ok(b"<html>not json</html>")), 2),
        (
            lambda w, i: _endless(
                w, b"HTTP/1.1 200 OK\r\nContent-Length: 67108864\r\n\r\n", b"x" * 32768
            ),
            2,
        ),
        (_silent, 2),
    ],
    ids=["5xx", "redirect", "garbage", "oversized", "silent"],
)
def test_a_failed_verification_is_retried_then_unavailable_and_a_settlement_unknown(
    run: Any, script: Script, verify_sends: int
) -> None:
    async def scenario() -> None:
        async with Peer(script) as peer:
            settler = _settler(peer.url)
            with pytest.raises(SettlerUnavailable) as caught:
                await _verify(settler)
            assert caught.value.code == "settler_unavailable"
            assert len(peer.requests) == verify_sends  # read-only: retried
            assert all(h.startswith("POST /verify ") for h in peer.heads())
            with pytest.raises(SettlementUnknown) as unknown:
                await settler.settle_body({"x402Version": 2})
            assert unknown.value.code == "settlement_unknown"
            assert len(peer.requests) == verify_sends + 1  # it left once: never sent again

    run(scenario)


def test_a_dead_facilitator_is_unavailable_and_nothing_is_left_unknown(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            url = peer.url
        settler = _settler(url)
        with pytest.raises(SettlerUnavailable):
            await _verify(settler)
        with pytest.raises(SettlerUnavailable):  # never connected: not an unknown outcome
            await settler.settle_body({"x402Version": 2})

    run(scenario)


def test_a_settlement_whose_connect_times_out_is_unavailable_not_unknown(run: Any) -> None:
    """A connect that never completed sent nothing: the settlement is unavailable (retried
    later), never an unknown outcome handed to the reconciler."""

    async def scenario() -> None:
        with unaccepting_listener() as port:
            settler = _settler(f"http://127.0.0.1:{port}")
            with pytest.raises(SettlerUnavailable):
                await settler.settle_body({"x402Version": 2})
            with pytest.raises(SettlerUnavailable):
                await _verify(settler)
            await settler.close()

    run(scenario)


def test_a_settlement_whose_tls_handshake_times_out_is_unavailable_not_unknown(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok(SETTLED))) as peer:  # plain TCP: never answers a ClientHello
            settler = _settler(f"https://127.0.0.1:{peer.port}")
            with pytest.raises(SettlerUnavailable):
                await settler.settle_body({"x402Version": 2})
            assert peer.requests == []
            await settler.close()

    run(scenario)


def test_a_settlement_timing_out_after_it_left_is_unknown_and_sent_once(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(_silent) as peer:  # connects, reads the settlement, never answers
            settler = _settler(peer.url)
            with pytest.raises(SettlementUnknown):
                await settler.settle_body({"x402Version": 2})
            assert peer.connections == 1
            assert [h.split(" ")[:2] for h in peer.heads()] == [["POST", "/settle"]]
            await settler.close()

    run(scenario)


def test_a_header_injection_is_refused_before_anything_leaves(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            settler = _settler(peer.url, headers={"X-Api-Key": SecretStr("k\r\nX-Evil: 1")})
            with pytest.raises(SettlerUnavailable):
                await _verify(settler)
            with pytest.raises(SettlerUnavailable):
                await settler.settle_body({"x402Version": 2})
            assert peer.connections == 0

    run(scenario)


def test_static_headers_and_a_fresh_jwt_ride_every_call(run: Any) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()

    async def scenario() -> None:
        async with Peer(answer(ok())) as peer:
            auth = CdpJwt("key-1", SecretStr(pem), extra={"X-Tenant": SecretStr("t1")})
            settler = _settler(peer.url, auth=auth)
            await _verify(settler)
            await _verify(settler)
            tokens = []
            for head in peer.heads():
                lines = head.split("\r\n")
                assert "X-Tenant: t1" in lines
                token = next(line for line in lines if line.startswith("Authorization: Bearer "))
                claims = token.split(".")[1]
                claims += "=" * (-len(claims) % 4)
                uris = json.loads(base64.urlsafe_b64decode(claims))["uris"]
                assert uris == [f"POST 127.0.0.1:{peer.port}/verify"]
                tokens.append(token)
            assert len(set(tokens)) == 2  # a fresh token per call
            static = _settler(peer.url, auth=StaticHeaders({"X-Api-Key": SecretStr("k1")}))
            await _verify(static)
            assert "X-Api-Key: k1" in peer.heads()[-1].split("\r\n")

    run(scenario)


def test_the_settler_resends_a_stale_verification_but_never_a_settlement(run: Any) -> None:
    async def scenario() -> None:
        async with Peer(_close_the_second_unanswered) as peer:
            settler = _settler(peer.url)
            await _verify(settler)
            assert (await _verify(settler)).is_valid is True  # resent on a new connection
            assert len(peer.requests) == 3
        async with Peer(_close_the_second_unanswered) as peer:
            settler = _settler(peer.url)
            await _verify(settler)
            with pytest.raises(SettlementUnknown):
                await settler.settle_body({"x402Version": 2})
            assert len(peer.requests) == 2  # the settlement left once and was not resent

    run(scenario)


def test_a_client_used_from_a_new_event_loop_starts_afresh() -> None:
    # A settler can outlive its loop (a command running asyncio.run per step); the
    # connections it kept there are dropped, never used on the next loop.
    class Keep(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            while head := self.rfile.readline():
                length = 0
                while head not in (b"\r\n", b""):
                    if head.lower().startswith(b"content-length:"):
                        length = int(head.split(b":")[1])
                    head = self.rfile.readline()
                self.rfile.read(length)
                self.wfile.write(ok())

    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), Keep) as server:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        client = FacilitatorHttp(f"http://127.0.0.1:{server.server_address[1]}")
        try:
            for _ in range(2):
                assert asyncio.run(call(client)).status == 200
                assert client.open_connections == 1  # this loop's one connection
        finally:
            server.shutdown()
