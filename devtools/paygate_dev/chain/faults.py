"""Fault switches and call counters of the dev facilitator, shared between threads.

The test process flips a switch; the facilitator's event loop reads it on the next request.
Everything here is guarded by a lock because the two run on different threads.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from paygate.errors import PaygateError

ENDPOINTS = ("verify", "settle", "supported")
RECEIVED_LIMIT = 1000  # request bodies kept for inspection, oldest dropped first


class Fault(StrEnum):
    """What the facilitator does instead of (or besides) answering normally."""

    NONE = "none"
    # Not a per-endpoint switch: the server stops listening (connections are refused).
    DOWN = "down"
    # Wait ``delay`` seconds, then answer normally.
    SLOW = "slow"
    # Answer 500 without doing anything.
    HTTP_500 = "http_500"
    # Answer 200 with a body that is not JSON, without doing anything.
    GARBAGE = "garbage"
    # Answer 200 with JSON nested 32,000 deep, under 64 KiB (C-stack recursion would die).
    DEEP_JSON = "deep_json"
    # Answer 200 with a JSON object holding a 5,000-digit integer.
    HUGE_NUMBER = "huge_number"
    # settle only: settle for real, then answer success=false, errorReason settlement_pending
    # with the transaction hash (what the SDK answers when the receipt wait fails).
    SETTLEMENT_PENDING = "settlement_pending"
    # settle only: accept the request and never answer it, without settling.
    HOLD_SETTLE = "hold_settle"
    # settle only: settle for real, then never answer.
    SETTLE_THEN_HANG = "settle_then_hang"


SETTLE_ONLY = frozenset({Fault.SETTLEMENT_PENDING, Fault.HOLD_SETTLE, Fault.SETTLE_THEN_HANG})


class FaultError(PaygateError):
    """an invalid fault switch"""

    code = "fault_error"


@dataclass
class FaultControls:
    """Per-endpoint fault switches. ``delay`` applies to SLOW; a request held by HOLD_SETTLE or
    SETTLE_THEN_HANG is dropped unanswered after ``hang_limit`` seconds (or on release/stop)."""

    delay: float = 2.0
    hang_limit: float = 300.0
    _modes: dict[str, Fault] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(
        self,
        fault: Fault | str,
        endpoints: Iterable[str] | str | None = None,
        *,
        delay: float | None = None,
    ) -> None:
        """Switch ``fault`` on for ``endpoints`` (default: settle for the settle-only faults,
        verify and settle for the others). DOWN is the server's business, not a switch here."""
        fault = Fault(fault)
        if fault is Fault.DOWN:
            raise FaultError("down is not an endpoint fault: call the server's down()")
        if endpoints is None:
            endpoints = ("settle",) if fault in SETTLE_ONLY else ("verify", "settle")
        elif isinstance(endpoints, str):
            endpoints = (endpoints,)
        endpoints = tuple(endpoints)
        for endpoint in endpoints:
            if endpoint not in ENDPOINTS:
                raise FaultError(f"unknown endpoint {endpoint!r}")
            if fault in SETTLE_ONLY and endpoint != "settle":
                raise FaultError(f"{fault} applies to settle only")
        with self._lock:
            if delay is not None:
                self.delay = delay
            for endpoint in endpoints:
                self._modes[endpoint] = fault

    def get(self, endpoint: str) -> Fault:
        with self._lock:
            return self._modes.get(endpoint, Fault.NONE)

    def clear(self) -> None:
        with self._lock:
            self._modes.clear()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            modes = {e: str(self._modes.get(e, Fault.NONE)) for e in ENDPOINTS}
            return {"modes": modes, "delay": self.delay, "hangLimit": self.hang_limit}


@dataclass
class FacilitatorStats:
    """What reached the facilitator: calls per endpoint, request bodies, settlement hashes."""

    _calls: Counter[str] = field(default_factory=Counter, repr=False)
    _received: list[tuple[str, Any]] = field(default_factory=list, repr=False)
    _transactions: list[str] = field(default_factory=list, repr=False)
    _held: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, endpoint: str, body: Any) -> None:
        with self._lock:
            self._calls[endpoint] += 1
            self._received.append((endpoint, body))
            del self._received[:-RECEIVED_LIMIT]

    def record_transaction(self, tx_hash: str) -> None:
        with self._lock:
            self._transactions.append(tx_hash)

    def held_delta(self, delta: int) -> None:
        with self._lock:
            self._held += delta

    def calls(self, endpoint: str) -> int:
        with self._lock:
            return self._calls[endpoint]

    @property
    def verify_calls(self) -> int:
        return self.calls("verify")

    @property
    def settle_calls(self) -> int:
        return self.calls("settle")

    @property
    def held(self) -> int:
        """Requests being held unanswered right now (HOLD_SETTLE, SETTLE_THEN_HANG)."""
        with self._lock:
            return self._held

    def received(self, endpoint: str | None = None) -> list[Any]:
        """Request bodies (parsed JSON, or None when unparseable), oldest first."""
        with self._lock:
            return [body for e, body in self._received if endpoint in (None, e)]

    @property
    def transactions(self) -> list[str]:
        """Hashes of settlement transactions broadcast, whatever was answered."""
        with self._lock:
            return list(self._transactions)

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._received.clear()
            self._transactions.clear()

    def wait_for(self, endpoint: str, count: int = 1, timeout: float = 10.0) -> None:
        """Block until ``endpoint`` has been called ``count`` times (or fail after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.calls(endpoint) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{endpoint}: {self.calls(endpoint)} calls, wanted {count}")
            time.sleep(0.01)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": {e: self._calls[e] for e in ENDPOINTS},
                "held": self._held,
                "transactions": list(self._transactions),
            }
