"""The gateway's Prometheus metrics (``prometheus_client``), one registry per app.

Labels come from closed sets only — the route table's names, status codes, error and payment
reason codes, networks and assets from the operator's terms — never from the URL, a header or
a body, so a caller cannot grow the series or read anything back.

Several worker processes: ``prometheus_client``'s multiprocess mode. The parent sets
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory **before** anything imports
``prometheus_client`` (the library picks its value store at import), every worker writes its
values there, and ``/metrics`` of any worker renders the sum over all of them
(:func:`prepare_multiprocess_dir`, :func:`worker_exited`; docs/OPERATIONS.md). Gauges then
say how they combine (``livesum`` for in-flight counts, ``livemax`` for the breaker).
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client import multiprocess as prometheus_multiprocess

from enclave import KeyBackend, KeyInfo
from paygate.upstream.usage import Usage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Seconds. Whole requests span a cached reply to a long generation; the gateway's own share is
# milliseconds; key operations are sub-millisecond in software, tens of ms on a TPM.
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
SETTLE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Distinct payment outcomes a process keeps as series: a refusal's code may be a facilitator's
# ``invalidReason``, an open set, so refusals past this many are counted as "other" (the first
# seen keep their own series; "admitted" always does).
MAX_OUTCOMES = 64
# A recovery pass of the transparency log: two reads, and a write when receipts are missing.
RECOVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
KEY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


def multiprocess_dir() -> Path | None:
    """The multiprocess directory when multiprocess mode is on, else None.

    Raises RuntimeError when the variable was set after ``prometheus_client`` was imported:
    values would then stay in this process while ``/metrics`` read the directory.
    """
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        return None
    if values.ValueClass is values.MutexValue:
        raise RuntimeError(f"{MULTIPROC_ENV} must be set before prometheus_client is imported")
    return Path(directory)


def prepare_multiprocess_dir(directory: Path) -> None:
    """Empty ``directory`` (a previous run's files would be summed in) and create it 0700.

    For the process that starts the workers, before any of them imports the metrics."""
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(mode=0o700, parents=True)


def worker_exited(pid: int) -> None:
    """Tell the multiprocess store that worker ``pid`` is gone (its live gauges drop out)."""
    directory = multiprocess_dir()
    if directory is not None:
        prometheus_multiprocess.mark_process_dead(pid, str(directory))


@dataclass(frozen=True, slots=True)
class _Declared:
    """One metric, created in each app's registry: its type, name, help and label names, and
    a histogram's buckets or a gauge's multiprocess mode (how the workers' values combine)."""

    kind: Callable[..., Any]
    name: str
    help: str
    labels: tuple[str, ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    def create(self, registry: CollectorRegistry) -> Any:
        return self.kind(self.name, self.help, self.labels, registry=registry, **self.options)


_ROUTE = ("route",)
_LIVESUM, _LIVEMAX = {"multiprocess_mode": "livesum"}, {"multiprocess_mode": "livemax"}
_LIVEMOSTRECENT = {"multiprocess_mode": "livemostrecent"}
# Every metric of the gateway, by the Metrics attribute that holds it.
_DECLARED: dict[str, _Declared] = {
    "_requests": _Declared(
        Counter, "paygate_requests", "Requests answered, by route and status.", (*_ROUTE, "status")
    ),
    "_errors": _Declared(
        Counter, "paygate_errors", "Errors answered by the gateway, by code.", ("code",)
    ),
    "_envelopes": _Declared(
        Counter, "paygate_request_envelopes", "Forwarded requests by body envelope.", ("envelope",)
    ),
    "_in_flight": _Declared(
        Gauge, "paygate_in_flight", "Upstream requests in flight.", (), _LIVESUM
    ),
    "_duration": _Declared(
        Histogram,
        "paygate_request_duration_seconds",
        "Whole request time, arrival to the reply's last byte, by route.",
        _ROUTE,
        {"buckets": REQUEST_BUCKETS},
    ),
    "_overhead": _Declared(
        Histogram,
        "paygate_overhead_seconds",
        "Gateway time not spent waiting on the model server, up to the reply's start.",
        _ROUTE,
        {"buckets": OVERHEAD_BUCKETS},
    ),
    "_first_chunk": _Declared(
        Histogram,
        "paygate_first_chunk_seconds",
        "Arrival to the first reply byte sent to the caller (time to first chunk).",
        _ROUTE,
        {"buckets": REQUEST_BUCKETS},
    ),
    "_upstream": _Declared(
        Histogram,
        "paygate_upstream_latency_seconds",
        "Forwarding to the model server's response headers (connect included).",
        _ROUTE,
        {"buckets": REQUEST_BUCKETS},
    ),
    "_payments": _Declared(
        Counter,
        "paygate_payments",
        "Payment admissions by outcome (admitted or the refusal code) and scheme.",
        ("outcome", "scheme"),
    ),
    "_earned": _Declared(
        Counter,
        "paygate_earned_atomic",
        "Amount settled to us, in the asset's atomic units.",
        ("network", "asset"),
    ),
    "_settlement": _Declared(
        Histogram,
        "paygate_settlement_seconds",
        "Settlement calls by outcome (settled, refused, pending, unavailable).",
        ("outcome",),
        {"buckets": SETTLE_BUCKETS},
    ),
    "_pending": _Declared(
        Gauge, "paygate_settlements_pending", "Settlements under way right now.", (), _LIVESUM
    ),
    "_breaker": _Declared(
        Gauge,
        "paygate_upstream_breaker_open",
        "1 while the model server's circuit breaker is open (refusing at once).",
        (),
        _LIVEMAX,
    ),
    "_retries": _Declared(
        Counter, "paygate_upstream_retries", "Upstream attempts repeated, by reason.", ("reason",)
    ),
    "_tokens": _Declared(
        Counter, "paygate_tokens", "Tokens the model server reported, by kind.", ("kind",)
    ),
    "_usage_replies": _Declared(
        Counter, "paygate_usage_replies", "Replies that stated their token usage."
    ),
    "_limit_events": _Declared(
        Counter,
        "paygate_limit_events",
        "Token limits and budgets reached, by kind and mode (enforced: refused; shadow: "
        "would have been).",
        ("kind", "mode"),
    ),
    "_key_ops": _Declared(
        Histogram,
        "paygate_key_operation_seconds",
        "Key backend operations (ECDH in the software key, HSM or TPM).",
        ("backend", "operation"),
        {"buckets": KEY_BUCKETS},
    ),
    "_recovered": _Declared(
        Counter,
        "paygate_tlog_recovered_receipts",
        "Receipts the ledger kept that the transparency log lacked, recorded by its recovery.",
    ),
    "_recovery_failures": _Declared(
        Counter,
        "paygate_tlog_recovery_failures",
        "Transparency log recovery passes that failed (each retried from the same place).",
    ),
    "_recovery_scan": _Declared(
        Histogram,
        "paygate_tlog_recovery_scan_seconds",
        "Transparency log recovery passes that completed, by how long they took.",
        (),
        {"buckets": RECOVERY_BUCKETS},
    ),
    "_recovery_checked": _Declared(
        Gauge,
        "paygate_tlog_recovery_checked_timestamp_seconds",
        "Every receipt the ledger kept before this time (Unix seconds) was checked against "
        "the transparency log.",
        (),
        _LIVEMAX,
    ),
    "_recovery_turn": _Declared(
        Gauge,
        "paygate_tlog_recovery_holding",
        "1 while this process holds its ledger's transparency log recovery turn (one per "
        "ledger at a time).",
        (),
        _LIVESUM,
    ),
    "_recovery_lag": _Declared(
        Gauge,
        "paygate_tlog_recovery_lag_seconds",
        "How far the transparency log's recovery is behind: seconds of kept receipts past "
        "the grace not checked against the log yet (0: caught up).",
        (),
        _LIVEMAX,
    ),
    "_withdrawal_scan_failures": _Declared(
        Counter,
        "paygate_batch_withdrawal_scan_failures",
        "Batch-settlement withdrawal scans that failed (the RPC or ledger down): vouchers are "
        "served meanwhile, and a payer's withdrawal may go unlearnt.",
    ),
    "_withdrawal_blocks_refused": _Declared(
        Counter,
        "paygate_batch_withdrawal_blocks_refused",
        "Times the RPC endpoint refused one block's batch-settlement withdrawal events: the "
        "scan stops before it (asked again next pass; after 3 passes in a row passed over, "
        "every channel's withdrawal read instead).",
    ),
    "_withdrawal_scanned": _Declared(
        Gauge,
        "paygate_batch_withdrawal_scan_success_timestamp_seconds",
        "When a batch-settlement withdrawal scan last completed (Unix seconds; 0: none yet).",
        (),
        _LIVEMAX,
    ),
    "_withdrawal_behind": _Declared(
        Gauge,
        "paygate_batch_withdrawal_scan_behind_blocks",
        "Blocks between the chain's newest block and the last one the batch-settlement "
        "withdrawal scan completed, at its last completed pass.",
        (),
        _LIVEMOSTRECENT,
    ),
    "_withdrawals_pending": _Declared(
        Gauge,
        "paygate_batch_withdrawals_pending",
        "Batch-settlement channels whose payer's withdrawal is pending, at the last completed "
        "withdrawal scan (claimed at the next wake when the withdrawal would take part of "
        "what they owe).",
        (),
        _LIVEMOSTRECENT,
    ),
}


class _Count:
    """A counter series' increments since the last scrape, in a plain number: the event loop's
    thread alone records them, so ``prometheus_client``'s lock per ``inc`` buys nothing."""

    __slots__ = ("_child", "_n")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._n: float = 0

    def inc(self, amount: float = 1) -> None:
        if amount < 0:  # as prometheus_client refuses it, at the call that made it
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self._n += amount

    def flush(self) -> None:
        n, self._n = self._n, 0
        if n:
            self._child.inc(n)


class _Observed:
    """A histogram series' observations since the last scrape: the sum and a count per bucket
    (the bucket ``prometheus_client`` would count it in: the first bound it does not
    exceed), added to the series at once when scraped."""

    __slots__ = ("_bounds", "_child", "_counts", "_sum")

    def __init__(self, child: Any) -> None:
        self._child = child
        self._bounds: tuple[float, ...] = tuple(child._upper_bounds)
        self._counts = [0] * len(self._bounds)
        self._sum = 0.0

    def observe(self, amount: float) -> None:
        self._sum += amount
        at = bisect_left(self._bounds, amount)
        if at < len(self._bounds) and amount <= self._bounds[at]:  # NaN: no bucket, as there
            self._counts[at] += 1

    def flush(self) -> None:
        counts, total = self._counts, self._sum
        if not any(counts) and not total:
            return
        self._counts, self._sum = [0] * len(counts), 0.0
        self._child._sum.inc(total)
        for bucket, n in zip(self._child._buckets, counts, strict=True):
            if n:
                bucket.inc(n)


class _Registry(CollectorRegistry):
    """A registry that adds what was recorded since the last scrape before it is read."""

    def __init__(self, before_collect: Callable[[], None]) -> None:
        super().__init__(auto_describe=True)
        self._before_collect = before_collect

    def collect(self) -> Iterator[Any]:
        self._before_collect()
        yield from super().collect()


class Metrics:
    """Every metric of one gateway app; its methods are the callbacks the stages are given.

    The request path's series (requests, durations, overhead, first chunk, upstream latency,
    envelopes, tokens) are recorded by the event loop's thread into plain numbers and added to
    ``prometheus_client``'s series when the registry is read (:meth:`render`, any
    ``registry.collect``): a scrape shows every request answered before it, at a fraction of
    the locked updates' cost. In multiprocess mode the values go to the shared files at once
    (another worker may render them). Key operations are tallied when the main thread (the
    event loop's: a key in this process's memory) reports them; from an executor thread (a
    TPM or token round trip, any key under epochs) they are recorded directly, as are the
    payments' settlements; a payment's admission (reported by the loop's thread alone, from
    ``PaymentProcessor.admit``) is tallied."""

    def __init__(self) -> None:
        self._dir = multiprocess_dir()
        self._children: dict[tuple[object, ...], Any] = {}
        self._outcomes: set[str] = {"admitted", "other"}
        self._tallies: list[_Count | _Observed] = []
        self._main_thread = threading.main_thread().ident
        self.registry = _Registry(self._flush)
        for attribute, declared in _DECLARED.items():  # self._requests, self._errors, ...
            setattr(self, attribute, declared.create(self.registry))
        # Children of the per-request metrics, bound once (labels from closed sets only).
        self._routes: dict[int, dict[str, Any]] = {}
        self._answered: dict[tuple[str, int], Any] = {}
        self._replies_stating_usage = self._recorded(self._usage_replies)
        self._checked: tuple[float, float] | None = None  # recovery: checked until, grace
        # Called with every error code answered (webhook alerts on attestation failures).
        self.on_error: Callable[[str], None] | None = None

    def _recorded(self, child: Any) -> Any:
        """What the request path records ``child``'s values into: a plain tally flushed at
        scrape time, or (multiprocess) the child itself."""
        if self._dir is not None:
            return child
        tally = _Observed(child) if isinstance(child, Histogram) else _Count(child)
        self._tallies.append(tally)
        return tally

    def _flush(self) -> None:
        for tally in self._tallies:
            tally.flush()

    # --- the request path (Gateway, Opener, Replies) ---

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: ``labels`` hashes and locks on every
        call, several times per request. Bounded: every label comes from a closed set."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._recorded(metric.labels(*labels))
        return child

    def _labelled(self, metric: Any, route: str) -> Any:
        """``metric.labels(route)`` of a metric with one label, remembered (made on first use,
        as the series appears then)."""
        children = self._routes.get(id(metric))
        if children is None:
            children = self._routes[id(metric)] = {}
        child = children.get(route)
        if child is None:
            child = children[route] = self._recorded(metric.labels(route))
        return child

    def observe(self, route: str, status: int) -> None:
        child = self._answered.get((route, status))
        if child is None:
            child = self._answered[(route, status)] = self._recorded(
                self._requests.labels(route, str(status))
            )
        child.inc()

    def duration(self, route: str, seconds: float) -> None:
        self._labelled(self._duration, route).observe(seconds)

    def error(self, code: str) -> None:
        self._errors.labels(code).inc()
        if self.on_error is not None:
            self.on_error(code)

    def limit_event(self, kind: str, enforced: bool) -> None:
        self._limit_events.labels(kind, "enforced" if enforced else "shadow").inc()

    def envelope(self, version: int) -> None:
        self._child(self._envelopes, f"v{version}" if version else "plaintext").inc()

    def upstream_latency(self, route: str, seconds: float) -> None:
        self._labelled(self._upstream, route).observe(seconds)

    def overhead(self, route: str, seconds: float) -> None:
        self._labelled(self._overhead, route).observe(seconds)

    def first_chunk(self, route: str, seconds: float) -> None:
        self._labelled(self._first_chunk, route).observe(seconds)

    def retry(self, reason: str) -> None:
        self._retries.labels(reason).inc()

    def usage(self, usage: Usage) -> None:
        """Tokens a reply's model server stated (paygate.upstream.usage)."""
        tokens = self._labelled(self._tokens, "prompt"), self._labelled(self._tokens, "completion")
        tokens[0].inc(usage.prompt_tokens)
        tokens[1].inc(usage.completion_tokens)
        self._replies_stating_usage.inc()

    def key_operation(self, backend: str, operation: str, seconds: float) -> None:
        if threading.get_ident() == self._main_thread:  # the loop's thread: an inline key
            self._child(self._key_ops, backend, operation).observe(seconds)
        else:  # an executor thread: the tallies belong to the loop's thread alone
            self._key_ops.labels(backend, operation).observe(seconds)

    # --- payments (paygate.x402.hooks.PaymentEvents) ---

    def admission(self, outcome: str, scheme: str) -> None:
        # On the loop's thread, every paid request: each series looked up once (one entry per
        # series, which prometheus_client keeps anyway).
        if outcome not in self._outcomes:
            if len(self._outcomes) >= MAX_OUTCOMES:
                outcome = "other"
            else:
                self._outcomes.add(outcome)
        self._child(self._payments, outcome, scheme).inc()

    def settlement(self, outcome: str, seconds: float) -> None:
        self._settlement.labels(outcome).observe(seconds)

    def earned(self, network: str, asset: str, amount: int) -> None:
        self._earned.labels(network, asset).inc(amount)

    def settling(self, delta: int) -> None:
        self._pending.inc(delta)

    # --- the transparency log's recovery (paygate.tlog.recovery.RecoveryEvents) ---

    def recovery_pass(self, seconds: float, recorded: int) -> None:
        self._recovery_scan.observe(seconds)
        if recorded:
            self._recovered.inc(recorded)

    def recovery_failed(self) -> None:
        self._recovery_failures.inc()

    def recovery_checked(self, until: float, grace: float) -> None:
        self._checked = (until, grace)
        self._recovery_checked.set(until)
        self._set_lag()

    def recovery_turn(self, holding: bool) -> None:
        self._recovery_turn.set(1 if holding else 0)

    def _set_lag(self) -> None:
        """The lag now: it grows between passes, and while passes fail or hang."""
        if self._checked is not None:
            until, grace = self._checked
            self._recovery_lag.set(max(0.0, time.time() - grace - until))

    # --- batch settlement's withdrawal scan (paygate.x402.schemes.batch_settlement.withdrawals
    # .WithdrawalEvents): the claimer's process alone reports it ---

    def withdrawal_scanned(self, behind: int, pending: int) -> None:
        self._withdrawal_scanned.set(time.time())
        self._withdrawal_behind.set(behind)
        self._withdrawals_pending.set(pending)

    def withdrawal_scan_failed(self) -> None:
        self._withdrawal_scan_failures.inc()

    def withdrawal_block_refused(self) -> None:
        self._withdrawal_blocks_refused.inc()

    # --- exposition ---

    def render(self, *, in_flight: int, breaker_open: bool | None = None) -> bytes:
        """The text exposition; the gauges read at scrape time are set first."""
        self._in_flight.set(in_flight)
        if breaker_open is not None:
            self._breaker.set(1 if breaker_open else 0)
        self._set_lag()
        if self._dir is None:
            return generate_latest(self.registry)
        # Multiprocess: the sum over every worker's files, not this process's registry.
        combined = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(combined, path=str(self._dir))
        return generate_latest(combined)


class TimedKey:
    """A key backend whose ECDH is timed into :meth:`Metrics.key_operation`."""

    def __init__(self, key: KeyBackend, metrics: Metrics) -> None:
        self._key = key
        self._metrics = metrics
        self._backend = key.info().backend

    @property
    def public_key(self) -> bytes:
        return self._key.public_key

    def ecdh(self, peer_public_key: bytes) -> bytes:
        started = time.perf_counter()
        try:
            return self._key.ecdh(peer_public_key)
        finally:
            self._metrics.key_operation(self._backend, "ecdh", time.perf_counter() - started)

    def info(self) -> KeyInfo:
        return self._key.info()

    def close(self) -> None:
        self._key.close()
