"""The gate in front of opening a sealed body before its payment is verified.

Where the price depends on the body (its model, its tokens), a sealed request must be opened
to learn it, and opening is a key operation on the TPM/HSM — work an unpaid caller can ask for.
Three bounds, all refusing at once (503 ``uploads_busy`` or 429 ``too_many_uploads``, never a
queue): ``slots`` opens at once in all, ``per_address`` at once per client address, and a
token bucket of ``per_second`` opens a second in all (burst ``slots``), so that however many
addresses a flood comes from, the key's share it takes is bounded. The rate is for keys in
hardware (TPM, PKCS#11), where an open is a device round trip; a key in this process's memory
(software, tee-memory: one ECDH, ~60 µs) is bounded by the slots alone (``per_second`` None), so
that every payer's first, unpaid try on a body-priced route is not held to the TPM's pace.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from paygate.server.errors import GatewayError
from paygate.server.limits import PerAddressSlots, Slots
from paygate.server.ratelimit import Rate, TokenBuckets

_EVERYONE = ""


class OpenGate:
    """``with gate.slot(address):`` around one open before payment."""

    def __init__(
        self,
        *,
        slots: int,
        per_address: int,
        per_second: float | None,
        busy: Callable[[], GatewayError],
        too_many: Callable[[], GatewayError],
    ) -> None:
        self._busy = busy
        self._slots = Slots(slots, busy)
        self._per_address = PerAddressSlots(per_address, too_many)
        self._rate = (
            TokenBuckets(Rate(per_second * 60.0, slots), max_buckets=1)
            if per_second is not None
            else None
        )

    @contextlib.contextmanager
    def slot(self, address: str) -> Iterator[None]:
        with self._per_address.slot(address), self._slots.slot():
            # The token last: a refusal by the slots above does not spend one.
            if self._rate is not None and not self._rate.take(_EVERYONE).allowed:
                raise self._busy()
            yield
