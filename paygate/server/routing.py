"""Which model server answers a request: routing by model, balancing, failover, cache isolation.

A layer in front of the upstream client (:class:`paygate.server.proxy.Upstream`, one per
model server, each with its own connector and circuit breaker): it picks the upstream, then
hands the exchange to that upstream's client.

- **Routing**: a request goes to the upstreams that serve its route and the ``model`` its body
  (or its path) names; a name nobody serves is 404 ``model_not_found``. A set of one serves
  every name (what the one server does with it is its own business), exactly as before.
- **Balancing**: the least outstanding requests per unit of weight among the upstreams whose
  breaker is closed; ties go to the one that served least.
- **Failover**, only before the first byte: a refused connection, a connection that broke
  before any reply, an open breaker, or a 503 (still loading) moves the request to another
  upstream serving the same model **with the same weights digest**, never to other weights
  and never once a reply has begun (then it is relayed, or cut). The last candidate gets the
  configured retries, as a lone upstream always did; a connect timeout or a slow first byte
  is not failed over (the clock is spent).
- **Cache isolation** (``paygate.server.isolation``): the request body gets the engine's
  per-payer parameter; a caller's own is refused.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from paygate.server.errors import (
    BadRequest,
    GatewayError,
    UpstreamDown,
    UpstreamFault,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from paygate.server.isolation import (
    Salts,
    SlotTable,
    Tenant,
    applies,
    parse_request,
    refuse_caller_keys,
    slot_fields,
    stateless_fields,
    with_fields,
)
from paygate.server.proxy import Upstream, UpstreamReply
from paygate.upstream.engines import profile_for
from paygate.upstream.engines.base import CacheControls, ServedRoute
from paygate.upstream.fleet import Member

SLOTS_PROBE_TIMEOUT = 2.0  # seconds to ask a llama-server how many slots it runs
MODELS_PATH = "/v1/models"


class ModelNotFound(GatewayError):
    """no upstream of this gateway serves that model"""

    message = "no upstream of this gateway serves that model"

    status = 404
    code = "model_not_found"


class ModelRequired(BadRequest):
    """name the model: this gateway serves several"""

    message = "the request names no model"

    code = "model_required"


@dataclass(slots=True)
class Backend:
    """One upstream as the router sees it."""

    member: Member
    upstream: Upstream  # the configured retries: the last (or only) candidate
    quick: Upstream  # no retries: a failure moves on to the next candidate at once
    controls: CacheControls
    routes: frozenset[tuple[str, str]]  # (method, route template) it serves
    index: int = 0
    in_flight: int = 0
    served: int = 0
    slots: SlotTable | None = None
    slots_known: bool = False

    @property
    def name(self) -> str:
        return self.member.name

    def allows(self) -> bool:
        breaker = self.member.service.breaker
        return breaker is None or breaker.allows()

    def score(self) -> tuple[float, float, int]:
        weight = self.member.entry.weight
        return (self.in_flight / weight, self.served / weight, self.index)


@dataclass(slots=True)
class Routed:
    """Where a request went (filled when its reply arrives): the receipt names the digest."""

    upstream: str | None = None
    digest: str | None = None
    failovers: int = field(default=0)


_FAILOVER = (UpstreamDown, UpstreamUnavailable, UpstreamFault)


class Router:
    """Routes each exchange to one backend; ``exchange`` is what the gateway calls."""

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        salts: Salts,
        first_byte_timeout: float,
        exclusive_slots: bool = True,
    ) -> None:
        if not backends:
            raise ValueError("a router needs at least one upstream")
        for index, backend in enumerate(backends):
            backend.index = index
        self._backends = tuple(backends)
        self._salts = salts
        self._first_byte = first_byte_timeout
        self._exclusive = exclusive_slots
        self._slot_locks = {b.name: asyncio.Lock() for b in backends}
        self._refused = frozenset(k for b in backends for k in b.controls.caller_keys)

    @property
    def backends(self) -> tuple[Backend, ...]:
        return self._backends

    def client_of(self, name: str | None) -> Upstream:
        """The client of the upstream named ``name`` (the one that answered a request: its
        engine's tokenizer counts a cut reply), no retries; the first when unknown."""
        for backend in self._backends:
            if backend.name == name:
                return backend.quick
        return self._backends[0].quick

    @property
    def several(self) -> bool:
        return len(self._backends) > 1

    @property
    def breaker_open(self) -> bool | None:
        """One upstream: its breaker's state. Several: open only when every breaker is."""
        states = [b.upstream.breaker_open for b in self._backends]
        known = [s for s in states if s is not None]
        if not known:
            return None
        return all(known)

    async def probe(self, timeout: float) -> bool:
        """True if any upstream answers HTTP (an unmonitored set's readiness)."""
        results = await asyncio.gather(*(b.upstream.probe(timeout) for b in self._backends))
        return any(results)

    def models_listing(self, method: str, route_path: str) -> bytes | None:
        """``GET /v1/models`` with several upstreams: the union of the names served, answered
        by the gateway (None: forward it, as a set of one does)."""
        if not self.several or (method, route_path) != ("GET", MODELS_PATH):
            return None
        seen: dict[str, None] = {}
        for backend in self._backends:
            for name in backend.member.entry.models:
                seen.setdefault(name, None)
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "paygate"} for n in seen]
        return json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()

    def _serving(self, method: str, route_path: str, model: str | None) -> list[Backend]:
        pool = [b for b in self._backends if (method, route_path) in b.routes]
        if not self.several:
            return pool
        if model is None:
            if method == "POST" and len(pool) > 1:
                raise ModelRequired("this gateway serves several models: name one")
            return pool
        pool = [b for b in pool if b.member.serves(model)]
        if not pool:
            raise ModelNotFound(f"no model server here serves {model[:64]!r}")
        return pool

    @staticmethod
    def _pick(pool: Sequence[Backend]) -> Backend:
        if len(pool) == 1:
            return pool[0]  # the only one, healthy or not (as below)
        healthy = [b for b in pool if b.allows()]
        return min(healthy or pool, key=Backend.score)

    def exchange(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None,
        headers: Mapping[str, str],
        route_path: str | None = None,
        model: str | None = None,
        tenant: Tenant | None = None,
        routed: Routed | None = None,
    ) -> RoutedExchange:
        """One request, to the chosen upstream (failing over before the first byte);
        ``async with`` yields once the response headers are in, like
        :meth:`Upstream.exchange`."""
        return RoutedExchange(self, method, path, body, headers, route_path, model, tenant, routed)

    async def _open(self, held: RoutedExchange) -> UpstreamReply:
        """The reply of the first backend that gives one; ``held`` keeps what its exit undoes
        (the exchange, a slot lease, the backend's in-flight count)."""
        method, path, body, headers = held.method, held.path, held.body, held.headers
        route_path, model, tenant, routed = held.route_path, held.model, held.tenant, held.routed
        pool = self._serving(method, route_path or path, model)
        if not pool:
            raise ModelNotFound("no model server here serves this route")
        document = parse_request(body) if method == "POST" and body else None
        refuse_caller_keys(document, self._refused)
        stateless = stateless_fields(route_path or path, document)
        backend = self._pick(pool)
        digest = backend.member.digest(model)
        # Failover candidates: the same model with the same known weights, nothing else.
        group = (
            [
                b
                for b in pool
                if b is not backend and digest is not None and b.member.digest(model) == digest
            ]
            if len(pool) > 1
            else []
        )
        tried: list[Backend] = []
        while True:
            remaining = [b for b in group if b not in tried]
            client = backend.quick if remaining else backend.upstream
            held.enter(backend)
            try:
                fields = await self._isolated(
                    held.undo, backend, method, route_path or path, document, tenant
                )
                fields.update(stateless)
                send = with_fields(document, fields) if document is not None and fields else body
                exchange = client.exchange(method, path, body=send, headers=headers)
                try:
                    reply = await exchange.__aenter__()
                except _FAILOVER as exc:
                    if isinstance(exc, UpstreamFault):
                        _failed(backend, "broken before reply")
                    if not remaining:
                        raise
                    failure: GatewayError | None = exc
                else:
                    held.exchange = exchange
                    failure = None
                    if reply.status == 503 and remaining:
                        failure = UpstreamUnavailable()  # still loading: try another now
            except BaseException as exc:
                await held.leave(type(exc), exc, exc.__traceback__)
                raise
            if failure is None:
                backend.served += 1
                if routed is not None:
                    routed.upstream = backend.name
                    routed.digest = backend.member.digest(model)
                return reply
            await held.leave(None, None, None)
            tried.append(backend)
            if routed is not None:
                routed.failovers += 1
            backend = self._pick([b for b in group if b not in tried])

    async def _isolated(
        self,
        undo: list[Callable[[], Awaitable[object]]],
        backend: Backend,
        method: str,
        route_path: str,
        document: dict[str, Any] | None,
        tenant: Tenant | None,
    ) -> dict[str, Any]:
        """The fields that carry ``backend``'s engine's cache isolation for ``tenant``."""
        controls = backend.controls
        if document is None or tenant is None or not applies(controls, method, route_path):
            return {}
        if controls.kind == "salt":
            return {controls.salt_key: self._salts.salt(tenant)}
        if controls.kind != "slots":
            return {}
        if not self._exclusive:
            return slot_fields(None, False)  # no lease: the tenant's salt is not needed
        salt = self._salts.salt(tenant)
        table = await self._slot_table(backend)
        loop = asyncio.get_running_loop()
        try:
            index, reuse = await table.lease(salt, loop.time() + self._first_byte)
        except TimeoutError:
            raise UpstreamTimeout("first_byte") from None
        undo.append(functools.partial(table.release, index))
        return slot_fields(index, reuse)

    async def _slot_table(self, backend: Backend) -> SlotTable:
        """The backend's slots, asked of the server once it answers (one slot until then:
        slot 0 always exists, and a slot id the server lacks would wait there forever)."""
        async with self._slot_locks[backend.name]:
            if not backend.slots_known:
                path = backend.controls.slots_path or "/props"
                count = await backend.member.service.slot_count(path, timeout=SLOTS_PROBE_TIMEOUT)
                if backend.slots is None:
                    backend.slots = SlotTable(count or 1)
                elif count is not None:
                    backend.slots.grow(count)
                backend.slots_known = count is not None
            assert backend.slots is not None
            return backend.slots


class RoutedExchange:
    """:meth:`Router.exchange` as a context manager (a class, not a generator and an exit
    stack: every request enters one). Exit undoes, last first: the upstream exchange, a slot
    lease, the backend's in-flight count."""

    __slots__ = (
        "_router",
        "backend",
        "body",
        "exchange",
        "headers",
        "method",
        "model",
        "path",
        "route_path",
        "routed",
        "tenant",
        "undo",
    )

    def __init__(
        self,
        router: Router,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str],
        route_path: str | None,
        model: str | None,
        tenant: Tenant | None,
        routed: Routed | None,
    ) -> None:
        self._router = router
        self.method, self.path, self.body, self.headers = method, path, body, headers
        self.route_path, self.model, self.tenant, self.routed = route_path, model, tenant, routed
        self.backend: Backend | None = None
        self.exchange: Any = None
        self.undo: list[Callable[[], Awaitable[object]]] = []

    def enter(self, backend: Backend) -> None:
        backend.in_flight += 1
        self.backend = backend

    async def leave(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Undo what entering the current backend did (each step even if one before fails)."""
        exchange, self.exchange = self.exchange, None
        backend, self.backend = self.backend, None
        undo, self.undo = self.undo, []
        try:
            if exchange is not None:
                await exchange.__aexit__(exc_type, exc, tb)
        finally:
            try:
                for step in reversed(undo):
                    await step()
            finally:
                if backend is not None:
                    backend.in_flight -= 1

    async def __aenter__(self) -> UpstreamReply:
        return await self._router._open(self)

    __aexit__ = leave  # leaving the block leaves the backend


def _failed(backend: Backend, reason: str) -> None:
    breaker = backend.member.service.breaker
    if breaker is not None:
        breaker.record_failure(reason)


def served_routes(kinds: Iterable[str]) -> tuple[ServedRoute, ...]:
    """The routes of every engine in the set (their further APIs too), each once, in order."""
    seen: dict[tuple[str, str], ServedRoute] = {}
    for kind in kinds:
        profile = profile_for(kind)
        for route in (*profile.routes(), *profile.api_routes()):
            seen.setdefault((route.method, route.path), route)
    return tuple(seen.values())


def build_backends(
    members: Sequence[Member], client: Callable[[Member, int], Upstream], retries: int
) -> list[Backend]:
    """A backend per upstream: its client with the configured retries, and one without (a
    failure moves on to another upstream at once while there is one)."""
    out = []
    for member in members:
        profile = profile_for(member.service.config.kind)
        routes = (*profile.routes(), *profile.api_routes())
        out.append(
            Backend(
                member=member,
                upstream=client(member, retries),
                quick=client(member, 0),
                controls=profile.cache_controls(),
                routes=frozenset((r.method, r.path) for r in routes),
            )
        )
    return out
