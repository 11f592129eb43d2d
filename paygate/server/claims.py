"""Which addresses' payment claims admission still believes, before verifying them.

A request that carries a payment header is a *claim*: on a body-priced route its sealed body is
opened (a key operation) before the payment is verified, through the claimed callers' own
:class:`~paygate.server.opengate.OpenGate` (``claimed_opens_per_second``, higher than the unpaid
callers' rate so that a payer making paid calls one after another is not held to it). A header
costs nothing to forge, though: a flood of forged claims would take that gate's whole rate, and
so the real payers' opens.

So a claim that fails once the key's work is done — its body does not open or parse, its
payment is refused (402), is an identifier's recorded outcome or one in progress (409: never
verified again, so one paid call would otherwise buy a flood of opens), or a payer's rate is
spent (429): any 4xx of the sender's doing — costs its sender: its address
is *doubted* for :data:`DOUBT_SECONDS`, and while doubted, its requests are admitted as unpaid
ones whatever header they carry (the unpaid pool and gate: its one slot per address and the
unpaid rate it shares with every other unpaid caller). A payment verified from the address
clears the doubt at once. What a forged-claim flood can take of the claimed gate is then one
open per address per :data:`DOUBT_SECONDS` (plus those in flight before its first refusal,
``per_ip_open_slots`` at a time), not the gate's rate; past that it is an unpaid flood, which
the unpaid gate already bounds.

Why the unpaid *gate*, and not merely a token of the unpaid bucket taken after the fact: a
token charged for every failed claim would let forged claims drain the unpaid callers' rate as
well as the claimed one; moving the doubted address into the unpaid gate bounds it exactly as an
unpaid caller is bounded, no more (it could send unpaid requests anyway). A refusal that is not
the sender's doing (5xx: a dependency down) doubts nobody, nor does the gate's own 429 (the
address's open slot taken: nothing was opened). Only a *verified* payment clears a doubt: a
request priced at nothing is admitted without its header being looked at.

Per address is :func:`~paygate.server.forwarded.address_key` (an IPv6 host by its prefix), the
key of every per-address limit, and per worker process (each ``--workers`` process doubts on
its own: a flood gets one believed claim per address in each). The record is bounded
(:data:`MAX_DOUBTED` addresses, the oldest forgotten first): forgetting one only gives that
address its one claimed open again.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from paygate.server.errors import GatewayError, TooManyUploads

#: Seconds an address whose claim failed is admitted as unpaid (unless a payment verifies).
DOUBT_SECONDS = 60.0
#: Addresses remembered at most (each ~170 bytes with its key, measured: ~11 MB in all).
MAX_DOUBTED = 65_536


def doubts(refusal: GatewayError) -> bool:
    """Does ``refusal`` of a claim, met once its body was read, doubt its address? Any 4xx of
    the sender's doing; not the open gate's own per-address refusal (raised before an open)."""
    return 400 <= refusal.status < 500 and not isinstance(refusal, TooManyUploads)


class DoubtedClaims:
    """The addresses whose last payment claim was refused, until their doubt expires."""

    __slots__ = ("_clock", "_until", "max_addresses", "seconds")

    def __init__(
        self,
        *,
        seconds: float = DOUBT_SECONDS,
        max_addresses: int = MAX_DOUBTED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_addresses = max_addresses
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()  # oldest doubt first

    def believed(self, address: str) -> bool:
        """May a claim from ``address`` be admitted as a claim (not as an unpaid request)?"""
        until = self._until.get(address)
        if until is None:
            return True
        if self._clock() < until:
            return False
        del self._until[address]
        return True

    def refused(self, address: str) -> None:
        """A claim from ``address`` was refused (:func:`doubts`): doubt it from now on."""
        self._until.pop(address, None)
        self._until[address] = self._clock() + self.seconds
        while len(self._until) > self.max_addresses:
            self._until.popitem(last=False)

    def verified(self, address: str) -> None:
        """A payment from ``address`` was verified: believe it again."""
        self._until.pop(address, None)

    def __len__(self) -> int:
        return len(self._until)
