"""The closed route table: the only methods and paths the gateway answers.

Anything not listed is a 404 and never reaches the model server (Obol's catch-all forwarded
Ollama's /api/pull, /api/delete ... unpaid: weakness 1 in the wire notes). Sans-IO: matching is
a pure function of (method, path), so it is unit-tested without sockets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal, Protocol
from urllib.parse import quote

from paygate import wire
from paygate.server.errors import ApiStyle
from paygate.upstream.engines import profile_for
from paygate.upstream.engines.base import ServedRoute
from paygate.x402.batch import BATCH_PATH
from paygate.x402.batch import ITEM_PATH as BATCH_ITEM_PATH

Target = Literal[
    "upstream",
    "batch",
    "health",
    "live",
    "ready",
    "metrics",
    "pubkey",
    "attestation",
    "activate",
    "log",
    "receipts",
]


class PriceHook(Protocol):
    """Prices one request on a paid route; the payments issue supplies real ones."""

    def __call__(self, route: Route) -> Decimal | None:
        """The price in the settlement asset, or None when the payment gate decides alone."""
        ...


@dataclass(frozen=True, slots=True)
class Route:
    """One entry of the table. ``path`` may hold one ``{name}`` segment (never a ``/``)."""

    method: str
    path: str
    api: ApiStyle
    paid: bool
    target: Target = "upstream"
    price: PriceHook | None = field(default=None, compare=False)
    # Query parameters the route takes; every other query string is refused (400). None of
    # today's routes take one (/v1/attestation will take ``nonce``).
    query: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """A matched route and the path to use upstream (rebuilt from the template, never echoed)."""

    route: Route
    params: Mapping[str, str]

    @property
    def upstream_path(self) -> str:
        path = self.route.path
        for name, value in self.params.items():
            path = path.replace("{" + name + "}", quote(value, safe=":@!$&'()*+,;=-._~"))
        return path


_PARAM = re.compile(r"\{([a-z_]+)(:path)?\}")


def _compile(template: str) -> re.Pattern[str]:
    # Literals escaped; ``{name}`` is one segment, ``{name:path}`` one or more (the log's tiles).
    regex, position = "", 0
    for found in _PARAM.finditer(template):
        regex += re.escape(template[position : found.start()])
        regex += f"(?P<{found[1]}>{'[^?#]+' if found[2] else '[^/]+'})"
        position = found.end()
    return re.compile(regex + re.escape(template[position:]))


class RouteTable:
    """An immutable set of routes; ``match`` is exact (no prefix, no trailing-slash leniency)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self._routes = tuple(routes)
        # Literal paths (all but one of the default table) are one dict lookup per request,
        # with their match built once; templates keep their regex and their place in the order.
        self._literal: dict[tuple[str, str], tuple[int, RouteMatch]] = {}
        templates = []
        for index, route in enumerate(self._routes):
            if _PARAM.search(route.path) is None:
                self._literal.setdefault((route.method, route.path), (index, RouteMatch(route, {})))
            else:
                templates.append((index, route, _compile(route.path)))
        self._templates = tuple(templates)

    @property
    def routes(self) -> tuple[Route, ...]:
        return self._routes

    def match(self, method: str, path: str) -> RouteMatch | None:
        """The route for ``method`` and the decoded ``path``, or None (the caller answers 404)."""
        literal = self._literal.get((method, path))
        before = literal[0] if literal is not None else len(self._routes)
        for index, route, pattern in self._templates:
            if index > before:
                break  # the literal route comes first in the table
            if route.method != method:
                continue
            found = pattern.fullmatch(path)
            if found is not None:
                params = found.groupdict()
                segments = (part for value in params.values() for part in value.split("/"))
                if any(part in (".", "..", "") for part in segments):
                    return None  # a dot segment is a path trick, never a model id
                return RouteMatch(route, params)
        return literal[1] if literal is not None else None


def engine_routes(served: Iterable[ServedRoute], price: PriceHook | None = None) -> RouteTable:
    """The table for an engine profile's routes (all paid), plus the gateway's local ones.

    Only what the engine serves exists: with llama-server, Ollama's ``/api/chat`` is a 404
    here and never reaches it. ``price`` is attached to every paid route.
    """
    upstream = [Route(r.method, r.path, r.api, paid=True, price=price) for r in served]
    if any((r.method, r.path) == ("POST", BATCH_ITEM_PATH) for r in served):
        # Chat requests in one paid batch, forwarded item by item (paygate.x402.batch).
        upstream.append(Route("POST", BATCH_PATH, "openai", paid=True, target="batch", price=price))

    def free(path: str, target: Target) -> Route:
        return Route("GET", path, "free", paid=False, target=target)

    return RouteTable(
        [
            *upstream,
            free(wire.HEALTH_PATH, "health"),
            free(wire.LIVE_PATH, "live"),
            free(wire.READY_PATH, "ready"),
            free(wire.METRICS_PATH, "metrics"),
            Route("GET", wire.PUBKEY_PATH, "openai", paid=False, target="pubkey"),
            Route(
                "GET",
                wire.ATTESTATION_PATH,
                "openai",
                paid=False,
                target="attestation",
                query=frozenset({"nonce"}),  # the verifier's nonce, checked by the handler
            ),
            Route("POST", wire.ATTESTATION_ACTIVATE_PATH, "openai", paid=False, target="activate"),
            # The transparency log (paygate.tlog): answered only when the log is kept.
            free(wire.LOG_CHECKPOINT_PATH, "log"),
            free(wire.LOG_TILE_PATH, "log"),
            Route(
                "GET",
                wire.LOG_RECEIPT_PROOF_PATH,
                "free",
                paid=False,
                target="log",
                query=frozenset({"leaf"}),
            ),
            Route(
                "GET", wire.RECEIPTS_PATH + "/{payment_id}", "openai", paid=False, target="receipts"
            ),
        ]
    )


def default_routes(price: PriceHook | None = None) -> RouteTable:
    """The table for Ollama, the default engine (OpenAI and Ollama-native routes)."""
    return engine_routes(profile_for("ollama").routes(), price)
