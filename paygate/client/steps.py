"""What both transports do, as steps without I/O: a request, an origin's key, and their running.

:meth:`ClientCore.flow` yields one request's commands; :func:`request_steps` adds what every
transport must do around them (a cached key taken without a step, a transport error thrown back
into the flow, the replies opened so far discarded on failure), and :func:`key_steps` fetches,
verifies and caches a key. A transport runs a step sequence with :class:`Run`: it only does each
step's I/O (read, send, close, call the caller's hook) and holds its own key lock around
:class:`LoadKey`, a threading or an asyncio lock.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

from paygate.client.attestation import MAX_EVIDENCE_BYTES, Attested, attestation_flow
from paygate.client.core import (
    ClientCore,
    Command,
    Deliver,
    Discard,
    LoadKey,
    ReadBody,
    Send,
)
from paygate.client.errors import AttestationFailed, ClientError
from paygate.client.pubkey import MAX_PUBKEY_DOCUMENT, EnclaveKey

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Hook:
    """Ask the caller's attestation hook about ``key`` → None (raising refuses the key)."""

    key: EnclaveKey


@dataclass(frozen=True, slots=True)
class Fetch:
    """Send ``request`` through the transport itself (sealed, paid, opened) and read its whole
    reply (at most ``limit`` bytes) → ``(response, body)``; the response is closed."""

    request: httpx.Request
    limit: int
    what: str


Step = Command | Hook | Fetch
Steps = Generator[Step, Any, T]


class Run(Generic[T]):
    """A step sequence being carried out: ``step`` is the one to do now (None: finished, and
    ``result`` is what the sequence returned). The driver reports what the step gave
    (:meth:`send`) or raised (:meth:`throw`); an error the sequence does not handle is raised
    from there."""

    result: T

    def __init__(self, steps: Steps[T]) -> None:
        self._steps = steps
        self.step: Step | None = None
        self._advance(lambda: next(steps))

    def send(self, value: object) -> None:
        self._advance(lambda: self._steps.send(value))

    def throw(self, error: BaseException) -> None:
        self._advance(lambda: self._steps.throw(error))

    def _advance(self, move: Callable[[], Step]) -> None:
        self.step = None
        try:
            self.step = move()
        except StopIteration as stop:
            self.result = stop.value


def request_steps(core: ClientCore, request: httpx.Request) -> Steps[Deliver]:
    """One request (:meth:`ClientCore.flow`) as steps. A transport error on a send is thrown
    into the flow, which may send again (core.send_paid); whatever else fails, every reply
    opened so far is discarded before the error is raised."""
    flow = core.flow(request)
    opened: list[httpx.Response] = []
    try:
        command = next(flow)
        while True:
            cached = core.cached_key(command.origin) if isinstance(command, LoadKey) else None
            if cached is not None:
                command = flow.send(cached)  # no lock, no I/O
                continue
            try:
                result = yield command
            except httpx.TransportError as exc:
                if not isinstance(command, Send):
                    raise
                command = flow.throw(exc)
                continue
            if isinstance(command, Send):
                opened.append(result)
            command = flow.send(result)
    except StopIteration as stop:
        deliver: Deliver = stop.value
        return deliver
    except GeneratorExit:
        flow.close()  # abandoned: no step can be done any more
        raise
    except BaseException:
        for response in opened:
            try:
                yield Discard(response)
            except Exception:  # noqa: S112 - a reply that fails to close: the error raised is the first one
                continue
        flow.close()
        raise


def key_steps(core: ClientCore, command: LoadKey) -> Steps[EnclaveKey]:
    """Fetch an origin's key, verify it as the AttestationPolicy asks, ask the caller's hook,
    cache it. A transport runs these under its key lock: one fetch at a time, so a key another
    request fetched meanwhile is taken from the cache."""
    key = core.cached_key(command.origin)
    if key is not None:
        return key
    request = core.key_request(command)
    status, body = yield from _fetch(request, MAX_PUBKEY_DOCUMENT, "the key document")
    key = core.accept_key(command.origin, status, body)
    attested: Attested | None = None
    if core.attestation is not None:
        flow = attestation_flow(command.origin, core.attestation, key.public_key)
        try:
            exchange = next(flow)
            while True:
                request = core.exchange_request(exchange, command.request, key)
                answer = yield from _fetch(request, MAX_EVIDENCE_BYTES, "the attestation evidence")
                exchange = flow.send(answer)
        except StopIteration as stop:
            attested = stop.value
        assert attested is not None  # the flow returns what it verified, or raises
        key = core.attested_key(key, attested)
    with _hook_refusal():
        yield Hook(key)
    core.store_key(key, attested)
    return key


def _fetch(request: httpx.Request, limit: int, what: str) -> Steps[tuple[int, bytes]]:
    response: httpx.Response = yield Send(request)
    body: bytes = yield ReadBody(response, limit, what)
    return response.status_code, body


@contextmanager
def _hook_refusal() -> Iterator[None]:
    """Around the caller's attestation hook: what it raises (other than our own ClientError)
    is the refusal of the key, as AttestationFailed."""
    try:
        yield
    except ClientError:
        raise
    except Exception as exc:
        detail = str(exc)[:200] or type(exc).__name__
        raise AttestationFailed(
            f"the attestation hook refused the appliance key: {detail}"
        ) from exc
