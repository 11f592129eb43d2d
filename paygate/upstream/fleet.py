"""Several model servers behind one gateway: the set of upstreams, each run as one is alone.

Every entry is an :class:`~paygate.upstream.service.UpstreamService` of its own: its own
container deployment (isolated as one is: its own relay socket, no network), its own health
monitor and circuit breaker, its own weights digests. The set starts them together and stops
them together; what the gateway routes by is here too: the model names each serves and its
weight. Routing itself is the server layer's (``paygate.server.routing``).

A set of one (the ``upstream_*`` settings) serves every model name, as a single upstream always
did; entries of ``PAYGATE_UPSTREAMS`` / ``[[upstream]]`` serve the names they list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp

from paygate.upstream.config import UpstreamConfig

if TYPE_CHECKING:
    from paygate.upstream.service import UpstreamService

log = logging.getLogger("paygate.upstream")


@dataclass(frozen=True, slots=True)
class UpstreamEntry:
    """One upstream of the set. ``models`` empty: it serves every name (a set of one)."""

    name: str
    config: UpstreamConfig
    models: tuple[str, ...] = ()
    weight: int = 1


@dataclass(slots=True)
class Member:
    """One running upstream and what routing needs to know about it."""

    entry: UpstreamEntry
    service: UpstreamService

    @property
    def name(self) -> str:
        return self.entry.name

    def serves(self, model: str | None) -> bool:
        if not self.entry.models:
            return True
        return model is not None and model in self.entry.models

    def digest(self, model: str | None) -> str | None:
        """The weights digest this upstream serves ``model`` with (None: not known)."""
        served = self.service.models
        if model is None:
            return served[0].digest if len(served) == 1 else None
        for item in served:
            if item.name == model or (len(served) == 1 and model in self.entry.models):
                return item.digest
        return None


class UpstreamSet:
    """The upstreams, started and stopped together; ``status()`` is ``/health/ready``'s."""

    def __init__(self, members: tuple[Member, ...]) -> None:
        if not members:
            raise ValueError("an upstream set needs at least one upstream")
        self.members = members

    @property
    def single(self) -> Member | None:
        return self.members[0] if len(self.members) == 1 else None

    @property
    def monitored(self) -> bool:
        return any(m.service.monitored for m in self.members)

    def model_names(self) -> list[str]:
        """The union of the names served, in configuration order."""
        names: dict[str, None] = {}
        for member in self.members:
            for name in member.entry.models or [m.name for m in member.service.models]:
                names.setdefault(name, None)
        return list(names)

    def models_document(self) -> list[dict[str, str]]:
        """``[{"name", "digest"[, "upstream"]}]``: every model with its digest and, with several
        upstreams, the upstream serving it (public: what attestation binds)."""
        single = self.single
        if single is not None:
            return single.service.models_document()
        out: list[dict[str, str]] = []
        for member in self.members:
            for model in member.entry.models:
                digest = member.digest(model)
                if digest is not None:
                    out.append({"name": model, "digest": digest, "upstream": member.name})
        return out

    def check_digests(self) -> None:
        """Log a model name served with different weights by different upstreams: requests
        are balanced across them, but never fail over from one digest to another."""
        seen: dict[str, set[str]] = {}
        for member in self.members:
            for model in member.entry.models:
                digest = member.digest(model)
                if digest is not None:
                    seen.setdefault(model, set()).add(digest)
        for model, digests in seen.items():
            if len(digests) > 1:
                log.warning(
                    "model %s is served with %d different weights digests: no failover "
                    "between them",
                    model,
                    len(digests),
                )

    def status(self) -> dict[str, Any]:
        """A set of one: its own status. Several: ready while every model name has a ready
        upstream; each upstream's own state under ``upstreams``."""
        single = self.single
        if single is not None:
            return single.service.status()
        states = {m.name: m.service.status() for m in self.members}
        ready = all(
            any(
                states[m.name].get("state") in ("ready", "unmonitored")
                for m in self.members
                if m.serves(model)
            )
            for model in self.model_names()
        )
        return {"state": "ready" if ready else "down", "upstreams": states}


@contextlib.asynccontextmanager
async def running_set(
    entries: tuple[UpstreamEntry, ...], sessions: Mapping[str, aiohttp.ClientSession]
) -> AsyncIterator[UpstreamSet]:
    """Every upstream started (concurrently: containers and weight hashing take a while);
    all stopped on exit, whatever happened to the others."""
    from paygate.upstream.service import running_upstream

    async with contextlib.AsyncExitStack() as stack:
        started = await asyncio.gather(
            *(
                stack.enter_async_context(running_upstream(e.config, sessions[e.name]))
                for e in entries
            ),
            return_exceptions=True,
        )
        failed = [result for result in started if isinstance(result, BaseException)]
        if failed:
            raise failed[0]
        members = tuple(
            Member(entry, service)  # type: ignore[arg-type]
            for entry, service in zip(entries, started, strict=True)
        )
        upstreams = UpstreamSet(members)
        upstreams.check_digests()
        yield upstreams
