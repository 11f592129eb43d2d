"""Per-payer prompt-cache isolation: a shared prefix cache is a timing side channel between
callers, so the gateway sets each engine's isolation parameter per payer.

- The **tenant** of a request is its payer (the address that paid) or, for a free request, the
  caller's address in a domain of its own: a free caller never shares a cache domain with a
  payer, whatever the address strings.
- The **salt** of a tenant is ``HMAC-SHA256(secret, domain NUL id)``, base64url (43 characters,
  256 bits: what vLLM asks of a ``cache_salt``). The secret never leaves the gateway, so a salt
  cannot be computed, nor another payer's guessed, from outside.
- **vLLM** (``salt``): ``cache_salt`` is set on the routes that take it.
- **llama-server** (``slots``): the gateway leases one of the server's slots to each request
  (``id_slot``) and lets it reuse the slot's cached prefix (``cache_prompt: true``) only when the
  slot's last request came from the same tenant; otherwise ``cache_prompt: false`` re-evaluates
  the whole prompt, and the slot belongs to the new tenant. A lease is held until the reply
  has been relayed, so the server never reorders two requests in one slot. With several
  gateway processes (``workers > 1``) slot ownership is not shared: then every request gets
  ``cache_prompt: false`` and no slot (isolated, without reuse).
- ``/v1/responses`` runs stateless (``store: false``; ``previous_response_id``, ``background``
  and ``conversation`` refused, 400 ``server_state_refused``): a response stored by the engine
  is state shared between payers that the gateway cannot bind to one.
- A caller that sets any of these fields itself (``cache_salt``, ``id_slot``, ``cache_prompt``)
  is refused with 400 ``cache_parameter_refused``: it would choose its cache domain.

Sans-IO but for :class:`SlotTable`'s wait (an asyncio condition, bounded by a deadline).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from paygate import jsonsafe
from paygate.server.errors import GatewayError, InvalidJSON
from paygate.upstream.engines.base import CacheControls
from paygate.x402.ledger import PaymentRecord

Domain = Literal["payer", "free"]


class CacheParameterRefused(GatewayError):
    """the request sets a cache-isolation parameter: the gateway sets it per payer"""

    message = "the request sets a cache-isolation parameter"

    status = 400
    code = "cache_parameter_refused"


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whose cache a request may share: a payer, or a free caller (by address)."""

    domain: Domain
    id: str


class Salts:
    """Tenant → salt, keyed by the gateway's secret (random per process when none is set)."""

    KEPT = 4096  # salts remembered (a payer's requests repeat); the table is emptied when full

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret else secrets.token_bytes(32)
        self._known: dict[tuple[str, str], str] = {}

    def salt(self, tenant: Tenant) -> str:
        key = (tenant.domain, tenant.id.lower())
        known = self._known.get(key)
        if known is not None:
            return known
        message = f"{key[0]}\x00{key[1]}".encode()
        mac = hmac.digest(self._secret, message, hashlib.sha256)
        salt = base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
        if len(self._known) >= self.KEPT:
            self._known.clear()
        self._known[key] = salt
        return salt


def tenant_of(record: PaymentRecord | None, client: str) -> Tenant:
    """A paid request's payer; a free one's address, in the free callers' own domain."""
    if record is not None and record.payer:
        return Tenant("payer", record.payer)
    return Tenant("free", client)


def refuse_caller_keys(document: Any, keys: Iterable[str]) -> None:
    """400 ``cache_parameter_refused`` if the request object sets any of ``keys``."""
    if isinstance(document, dict) and any(key in document for key in keys):
        raise CacheParameterRefused()


def parse_request(body: bytes) -> dict[str, Any] | None:
    """A JSON request body as an object, or None when it is not one (the server answers it)."""
    if not body:
        return None
    try:
        document = jsonsafe.loads(body, max_bytes=len(body), max_depth=None)
    except jsonsafe.UntrustedJSONError:
        raise InvalidJSON from None
    return document if isinstance(document, dict) else None


def with_fields(document: dict[str, Any], fields: dict[str, Any]) -> bytes:
    """``document`` with ``fields`` set, as the body to send."""
    return json.dumps({**document, **fields}, separators=(",", ":")).encode()


class SlotTable:
    """One llama-server's slots: which tenant each last served, and which are leased now."""

    def __init__(self, count: int) -> None:
        self._owners: list[str | None] = [None] * count
        self._last_used: list[int] = [0] * count
        self._leased: set[int] = set()
        self._clock = 0
        self._changed = asyncio.Condition()

    @property
    def count(self) -> int:
        return len(self._owners)

    def grow(self, count: int) -> None:
        """The server runs ``count`` slots (learnt after a fallback guess)."""
        extra = count - len(self._owners)
        if extra > 0:
            self._owners += [None] * extra
            self._last_used += [0] * extra

    def owner(self, index: int) -> str | None:
        return self._owners[index]

    def _choose(self, salt: str) -> int | None:
        free = [i for i in range(len(self._owners)) if i not in self._leased]
        if not free:
            return None
        own = [i for i in free if self._owners[i] == salt]
        if own:
            return own[0]
        # Unowned first, then the least recently used: keep other tenants' caches longest.
        return min(free, key=lambda i: (self._owners[i] is not None, self._last_used[i]))

    async def lease(self, salt: str, deadline: float) -> tuple[int, bool]:
        """A free slot for ``salt`` (waiting until ``deadline``, loop time; TimeoutError after)
        and whether its cache may be reused (it last served this same tenant)."""
        async with self._changed:
            async with asyncio.timeout_at(deadline):
                while (index := self._choose(salt)) is None:
                    await self._changed.wait()
            reuse = self._owners[index] == salt
            self._leased.add(index)
            self._owners[index] = salt
            self._clock += 1
            self._last_used[index] = self._clock
            return index, reuse

    async def release(self, index: int) -> None:
        async with self._changed:
            self._leased.discard(index)
            self._changed.notify()


class ServerStateRefused(GatewayError):
    """stored responses are not offered here: send the conversation itself"""

    message = "stored responses are not offered here"

    status = 400
    code = "server_state_refused"


RESPONSES_PATH = "/v1/responses"
# Responses the engine would keep between requests: one payer's stored response could be
# continued (or read) by another who learns its id, and the gateway cannot bind them to payers.
_SERVER_STATE = ("previous_response_id", "background", "conversation")


def stateless_fields(path: str, document: dict[str, Any] | None) -> dict[str, Any]:
    """``/v1/responses`` runs stateless: ``store`` false, the stored-state fields refused."""
    if path != RESPONSES_PATH or document is None:
        return {}
    if any(document.get(key) not in (None, False) for key in _SERVER_STATE):
        raise ServerStateRefused()
    return {"store": False}


def slot_fields(index: int | None, reuse: bool) -> dict[str, Any]:
    """llama-server's request fields for a leased slot (None: no slot, no reuse)."""
    if index is None:
        return {"cache_prompt": False}
    return {"id_slot": index, "cache_prompt": reuse}


def applies(controls: CacheControls, method: str, path: str) -> bool:
    return method == "POST" and path in controls.paths
