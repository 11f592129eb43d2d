"""The app factory: the one place where the gateway's object graph is built.

Settings in, an ``aiohttp.web.Application`` out. Long-lived resources (the key backend, the
upstream ClientSession) are opened and closed by ``cleanup_ctx``, stored under ``AppKey``s, and
handed explicitly to the pipeline; there is no module-level state.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import aiohttp
from aiohttp import web
from eth_account import Account

from enclave import KeyBackend
from enclave.attestation import binding
from enclave.attestation.gpu import GpuEvidenceProvider, GpuUnavailable
from enclave.attestation.providers import EvidenceProvider, open_provider
from enclave.attestation.providers import EvidenceUnavailable as TeeUnavailable
from enclave.keys.base import ReceiptSigner
from enclave.keys.epochs import EpochKeys
from enclave.keys.shared_epochs import host_lock
from paygate.config import ConfigError, Settings, settings_view
from paygate.economics.alerts import WebhookAlerts
from paygate.economics.watch import attestation_alert, watch_forever
from paygate.keys import epoch_keys, open_key_backend
from paygate.server import frontend, malformed
from paygate.server.admission import Admission, AdmissionLimits
from paygate.server.assembly import (
    alert_sink,
    check_payment_settings,
    payment_step,
    payment_terms,
    price_policy,
    rate_limits,
    request_shaper,
    token_pricing,
)
from paygate.server.attestation import (
    AttestationConfig,
    AttestationService,
    channel_terms,
    code_digest,
    gateway_version,
    offered_channels,
    parse_models,
    payment_document,
)
from paygate.server.epochs import EpochRotation, rotating
from paygate.server.errors import (
    BodyTooLarge,
    ExpectationFailed,
    GatewayError,
    InternalError,
    api_style_for_path,
    error_response,
)
from paygate.server.forwarded import parse_networks
from paygate.server.gateway import BatchLimits, Gateway
from paygate.server.health import LocalEndpoints
from paygate.server.isolation import Salts
from paygate.server.limits import ConcurrencyLimiter
from paygate.server.logs import add_request_id, request_events
from paygate.server.metrics import Metrics, TimedKey
from paygate.server.opening import Opener
from paygate.server.payments import PaymentStep, X402Payments
from paygate.server.proxy import Timeouts, Upstream
from paygate.server.ratelimit import RateLimits
from paygate.server.receipts import ReceiptEndpoint, ReceiptIssuer
from paygate.server.replies import Replies, ReplyLimits
from paygate.server.routes import RouteTable, engine_routes
from paygate.server.routing import Router, build_backends, served_routes
from paygate.server.tracing import Tracing
from paygate.tlog import assembly as tlog_assembly
from paygate.tlog.service import running as running_log
from paygate.upstream.fleet import Member, UpstreamEntry, UpstreamSet, running_set
from paygate.upstream.http1 import Pool
from paygate.upstream.service import base_url as upstream_base_url
from paygate.upstream.service import connector as upstream_connector
from paygate.upstream.service import endpoint as upstream_endpoint
from paygate.upstream.shaping import RequestShaper
from paygate.x402.ledger import default_replica_id
from paygate.x402.schemes.batch_settlement.channel import NAME as CHANNEL_SCHEME

KEY = web.AppKey("key", KeyBackend)
SESSION = web.AppKey("session", aiohttp.ClientSession)
OUTBOUND = web.AppKey("outbound", aiohttp.ClientSession)
GATEWAY = web.AppKey("gateway", Gateway)
METRICS = web.AppKey("metrics", Metrics)
LIMITER = web.AppKey("limiter", ConcurrencyLimiter)
UPSTREAM = web.AppKey("upstream", UpstreamSet)
PAYMENTS = web.AppKey("payments", PaymentStep)  # type: ignore[type-abstract]
ATTESTATION = web.AppKey("attestation", AttestationService)
ALERTS = web.AppKey("alerts", WebhookAlerts)
ROTATION = web.AppKey("rotation", EpochRotation)

log = logging.getLogger("paygate.server")
LINGERING_SECONDS = 5.0
# The kernel's accept queue: a burst of connections beyond it waits for SYN retries (≥ 1 s) and
# may be reset; nginx's default is 511.
LISTEN_BACKLOG = 1024
OUTBOUND_CONNECTIONS = 100  # to the facilitator: aiohttp's default pool size
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def answer_errors(request: web.Request, handler: Handler | None = None) -> web.StreamResponse:
    """``handler``'s answer (by default the gateway's, :meth:`Gateway.handle`): every failure
    becomes JSON in the route's shape; unexpected ones a bare 500.

    Called by the one catch-all handler rather than mounted as a middleware: every request
    reaches that handler, and aiohttp's middleware chain is rebuilt per request.

    Only the exception class is logged for the unexpected: its message or traceback could
    quote a body or a header.
    """
    api = api_style_for_path(request.path)
    try:
        if handler is None:
            return await request.app[GATEWAY].handle(request)
        return await handler(request)
    except GatewayError as exc:
        response = exc.render(api)
        if exc.status in (408, 413):
            # The unread rest of the body is not worth draining: close after answering.
            response.force_close()
        return response
    except ConnectionResetError:
        # The caller's socket is gone mid-reply; 499 (client closed) only reaches the access log.
        return web.Response(status=499)
    except web.HTTPException as exc:
        # aiohttp's own refusals (e.g. a malformed request it detected) in our shape.
        error = GatewayError(exc.reason)
        error.status, error.code = exc.status, "http_error"
        return error_response(error, api)
    except Exception as exc:
        log.error("unexpected %s while handling a request", type(exc).__name__)
        return error_response(InternalError(), api)


@dataclasses.dataclass(frozen=True, slots=True)
class Plan:
    """What the factory works out from the settings before anything opens (every ConfigError it
    can raise is raised here); each resource below is handed it."""

    settings: Settings
    key: KeyBackend | None  # given by the caller (and closed by the caller), or None: opened
    payments: PaymentStep | None  # given, or None: the configured payment step
    routes: RouteTable
    gpu: GpuEvidenceProvider | None  # given, or None: as ``gpu_evidence`` says
    attestation: AttestationConfig
    limits: RateLimits | None  # one set of token buckets: addresses (admission) and payers
    entries: tuple[UpstreamEntry, ...]
    shaper: RequestShaper  # one output-limit and options policy for every path
    alerts: WebhookAlerts | None
    tracing: Tracing | None  # OTLP traces when OTEL_EXPORTER_OTLP_ENDPOINT is set
    replica: str
    salts: Salts
    # One ClientSession per upstream, opened by client_session, used by the gateway's router.
    sessions: dict[str, aiohttp.ClientSession] = dataclasses.field(default_factory=dict)
    # With workers > 1 the key epochs are the host's, shared by every worker: their key ids
    # name the host's replica, not the worker's (paygate.keys.epoch_keys).
    epoch_replica: str | None = None


def build_app(
    settings: Settings,
    *,
    key: KeyBackend | None = None,
    payments: PaymentStep | None = None,
    routes: RouteTable | None = None,
    gpu: GpuEvidenceProvider | None = None,
    worker: int = 1,
    epoch_replica: str | None = None,
) -> web.Application:
    """Build the gateway for ``settings`` (as worker ``worker`` of ``settings.workers``).

    ``key`` is opened from the settings at startup (and closed at cleanup) unless given; a
    given key stays the caller's to close. ``gpu``: the GPU evidence provider (default: as
    ``gpu_evidence`` says). ``epoch_replica``: the replica the key epochs of several workers
    are named for (default: this one's). ``payments`` defaults to the configured payment
    mode; payment settings that cannot work raise ConfigError here, before anything listens.
    Below this factory nothing reads ``Settings``: each part gets its own typed view.
    """
    plan = make_plan(settings, key=key, payments=payments, routes=routes, gpu=gpu, worker=worker)
    plan = dataclasses.replace(plan, epoch_replica=epoch_replica)
    app = web.Application(client_max_size=settings.max_body_bytes)
    if plan.tracing is not None:
        app.on_cleanup.append(functools.partial(stop_tracing, plan.tracing))
    app.on_response_prepare.append(add_request_id)
    app[METRICS] = Metrics()
    app[LIMITER] = ConcurrencyLimiter(
        settings.max_concurrent_requests, settings.retry_after_seconds
    )
    # Opened in this order at start, closed in reverse at cleanup.
    for resource in (
        key_backend,
        client_session,
        upstream_runtime,
        alerting,
        payment,
        gateway,
        watcher,
    ):
        app.cleanup_ctx.append(functools.partial(resource, plan))
    catch_all(app, plan)
    return app


def make_plan(
    settings: Settings,
    *,
    key: KeyBackend | None,
    payments: PaymentStep | None,
    routes: RouteTable | None,
    gpu: GpuEvidenceProvider | None,
    worker: int = 1,
) -> Plan:
    if payments is None:
        check_payment_settings(settings)
    entries = settings.upstream_entries()
    if routes is None:
        # The union of what the upstreams' engines serve (their further APIs included).
        routes = engine_routes(served_routes(e.config.kind for e in entries))
    salt_secret = settings.secret("cache_salt_secret")
    return Plan(
        settings=settings,
        key=key,
        payments=payments,
        routes=routes,
        gpu=gpu,
        attestation=attestation_config(settings),
        limits=rate_limits(settings, worker),
        entries=entries,
        shaper=request_shaper(settings),
        alerts=alert_sink(settings),  # ConfigError here, before anything listens
        tracing=Tracing.from_environment(system=settings.upstream_kind, version=gateway_version()),
        replica=settings.replica_id or default_replica_id(),
        salts=Salts(salt_secret.get_secret_value().encode() if salt_secret is not None else None),
    )


async def stop_tracing(tracing: Tracing, app: web.Application) -> None:
    await asyncio.to_thread(tracing.shutdown)  # what is batched goes out, bounded


async def key_backend(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    settings, owned = plan.settings, plan.key is None
    if plan.key is not None:
        base = plan.key
    elif settings.key_epoch and settings.workers > 1:
        # Not while another worker makes or destroys epoch keys in the same token or TPM.
        with host_lock(settings.key_epoch_dir):
            base = open_key_backend(settings)
    else:
        base = open_key_backend(settings)
    if settings.key_epoch:
        # Rotating epoch keys made in the same backend; the base keeps the AK and log key.
        try:
            app[KEY] = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: epoch_keys(
                    settings, base, plan.epoch_replica or plan.replica, close_base=owned
                ),
            )
        except BaseException:
            if owned:
                base.close()
            raise
    else:
        app[KEY] = base
    yield
    if owned or settings.key_epoch:
        # Epochs are destroyed at stop (a given base key stays the caller's).
        await asyncio.get_running_loop().run_in_executor(None, app[KEY].close)


async def client_session(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    # One session per upstream: TCP, or the relay's unix socket for a container
    # (paygate.upstream, docs/UPSTREAM.md), each its own pool.
    sessions = plan.sessions
    for entry in plan.entries:
        connector = upstream_connector(entry.config, limit=plan.settings.max_concurrent_requests)
        # Timeouts are per exchange (proxy.Timeouts); the session's own stay off.
        sessions[entry.name] = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
            trust_env=False,
            # No cookie store: a model server's Set-Cookie must never ride along on the next
            # caller's request (and filtering a jar per request is wasted work).
            cookie_jar=aiohttp.DummyCookieJar(),
        )
    app[SESSION] = sessions[plan.entries[0].name]
    # Everything else that leaves the appliance (the facilitator) has its own TCP session:
    # in container mode the session above is bound to the relay's unix socket, which
    # ignores the URL's host and would hand payments to the model server.
    app[OUTBOUND] = outbound_session()
    yield
    for session in sessions.values():
        await session.close()
    await app[OUTBOUND].close()


async def upstream_runtime(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    # Container mode: start the isolated model server and wait for it (bounded) before
    # listening; then the health monitor and the breaker the proxy consults.
    async with running_set(plan.entries, plan.sessions) as upstreams:
        app[UPSTREAM] = upstreams
        yield


async def alerting(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    # Webhook alerts: delivered by one background task, never on a request's path.
    alerts = plan.alerts
    if alerts is None:
        yield
        return
    app[ALERTS] = alerts
    app[METRICS].on_error = attestation_alert(alerts, plan.replica)
    async with background(alerts.run()):
        yield


async def payment(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    if plan.payments is not None:
        app[PAYMENTS] = plan.payments
        yield
        return
    async with payment_step(
        plan.settings,
        app[OUTBOUND],
        plan.limits,
        app[METRICS],
        alerts=plan.alerts,
        on_limit_event=app[METRICS].limit_event,
        shaper=plan.shaper,
    ) as built:
        app[PAYMENTS] = built
        yield


async def gateway(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    """The request path: attestation (measured and certified before listening), the router
    over the upstreams, receipts, the transparency log and key rotation, the Gateway."""
    settings = plan.settings
    # Each model server's forwarding pool (paygate.upstream.http1), shared by its two
    # clients; the sessions stay for the probes.
    pools: dict[str, Pool] = {}
    upstream = router(plan, app, pools)
    bound, service = await attestation_service(plan, app)
    # The release and key epoch are logged before the gateway listens (docs/TRANSPARENCY.md).
    tlog = None
    if bound.log is not None:
        tlog = await tlog_assembly.start_log(settings, app[KEY], service)
        tlog.recovery.events = app[METRICS]  # before its recovery runs (running_log below)
    metrics = app[METRICS]
    timed_key = TimedKey(app[KEY], metrics)
    epochs = app[KEY] if isinstance(app[KEY], EpochKeys) else None
    local = LocalEndpoints(
        key=timed_key,
        upstream=upstream,
        limiter=app[LIMITER],
        metrics=metrics,
        payment_mode=settings.payment_mode,
        probe_timeout=settings.ready_probe_timeout,
        check_interval=settings.upstream_health_interval,
        upstream_status=app[UPSTREAM].status if app[UPSTREAM].monitored else None,
        models=app[UPSTREAM].models_document(),
        attestation=service,
        epochs=epochs,
    )
    opener = Opener(
        timed_key,
        metrics.envelope,
        epochs=epochs,
        timed=lambda epoch_key: TimedKey(epoch_key, metrics),
    )
    issuer = (
        ReceiptIssuer(
            app[KEY], bound.models, on_signed=tlog.record_receipt if tlog is not None else None
        )
        if isinstance(app[KEY], ReceiptSigner)
        else None
    )
    payments = app[PAYMENTS]
    receipts = ReceiptEndpoint(
        payments.processor.ledger if isinstance(payments, X402Payments) else None, issuer
    )
    app[GATEWAY] = Gateway(
        routes=plan.routes,
        admission=Admission(admission_limits(settings), payments, opener, rate_limits=plan.limits),
        opener=opener,
        upstream=upstream,
        replies=Replies(reply_limits(settings), metrics, issuer),
        limiter=app[LIMITER],
        metrics=metrics,
        local={
            **local.handlers(),
            "receipts": receipts.handle,
            **({"log": tlog.handle} if tlog is not None else {}),
        },
        batch=BatchLimits(
            max_items=settings.batch_max_items,
            concurrency=settings.batch_concurrency,
            item_reply_bytes=settings.max_plain_reply_bytes,
        ),
        shaper=plan.shaper,
        tracing=plan.tracing,
    )
    try:
        async with contextlib.AsyncExitStack() as stack:
            if tlog is not None:
                await stack.enter_async_context(running_log(tlog))
            if epochs is not None:
                # Each rotation is a key-epoch entry in the transparency log, if one is kept.
                listeners = [tlog_assembly.on_rotation(tlog, service)] if tlog is not None else []
                app[ROTATION] = await stack.enter_async_context(
                    rotating(epochs, settings.key_epoch_dir, listeners)
                )
            yield
    finally:
        for pool in pools.values():
            await pool.close()


def router(plan: Plan, app: web.Application, pools: dict[str, Pool]) -> Router:
    """The router over every upstream's client; ``pools`` collects their forwarding pools."""
    settings = plan.settings
    timeouts = Timeouts(
        connect=settings.connect_timeout,
        first_byte=settings.first_byte_timeout,
        idle=settings.idle_timeout,
        total=settings.total_timeout,
    )

    def client(member: Member, retries: int) -> Upstream:
        # The upstream client of one model server; the router picks which, before it.
        pool = pools.get(member.name)
        if pool is None:
            pool = Pool(
                upstream_endpoint(member.service.config),
                limit=settings.max_concurrent_requests,
            )
            pools[member.name] = pool
        return Upstream(
            plan.sessions[member.name],
            upstream_base_url(member.service.config),
            timeouts,
            pool=pool,
            breaker=member.service.breaker,
            api_key=member.service.api_key,
            retries=retries,
            metrics=app[METRICS],
        )

    return Router(
        build_backends(app[UPSTREAM].members, client, settings.upstream_max_retries),
        salts=plan.salts,
        first_byte_timeout=settings.first_byte_timeout,
        # Slot ownership lives in this process: shared only when it is the only one.
        exclusive_slots=settings.workers == 1,
    )


async def attestation_service(
    plan: Plan, app: web.Application
) -> tuple[AttestationConfig, AttestationService]:
    """The binding (the weights' digests computed at start, the payment terms as offered, the
    log's identity), then PCR 23 measures the application and the keys are certified."""
    settings, attestation = plan.settings, plan.attestation
    payment = attestation.payment
    if payment is not None and isinstance(app[PAYMENTS], X402Payments):
        # The payment terms as offered, with the upto facilitator the settler named and the
        # channel terms of the bound batch-settlement scheme.
        processor = app[PAYMENTS].processor
        payment = attestation_config(
            settings, processor.terms.upto_extra, offered_channels(processor)
        ).payment
    try:
        bound = dataclasses.replace(
            attestation,
            models=parse_models(app[UPSTREAM].models_document()),
            payment=payment,
            log=tlog_assembly.identity(settings, app[KEY]),  # None unless transparency_log
        )
    except binding.BindingInvalid as exc:
        raise ConfigError(f"a served model cannot be attested: {exc}") from None
    service = AttestationService(
        bound,
        app[KEY],
        provider=tee_provider(settings, bound.kind),
        gpu=plan.gpu if plan.gpu is not None else gpu_provider(settings),
    )
    try:
        await asyncio.get_running_loop().run_in_executor(None, service.start)
    except TypeError as exc:  # a key backend without what this evidence kind needs
        raise ConfigError(f"attestation {attestation.kind}: {exc}") from None
    app[ATTESTATION] = service
    return bound, service


async def watcher(plan: Plan, app: web.Application) -> AsyncIterator[None]:
    # The review queue (shared ledger) and this replica's model server, for alerts.
    alerts = plan.alerts
    if alerts is None:
        yield
        return
    service = app[UPSTREAM]
    watching = watch_forever(
        alerts,
        store=lambda: alerts.store,
        upstream=service.status if service.monitored else None,
        replica=plan.replica,
        interval=plan.settings.alert_interval_seconds,
    )
    async with background(watching):
        yield


@contextlib.asynccontextmanager
async def background(work: Coroutine[Any, Any, Any]) -> AsyncIterator[None]:
    """``work`` as a task for the block; cancelled (and awaited) at its end."""
    task = asyncio.get_running_loop().create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def catch_all(app: web.Application, plan: Plan) -> None:
    """One route for everything: the closed RouteTable, not aiohttp's router, decides what
    exists; the Expect handler refuses an oversized body before inviting it."""
    events = request_events(parse_networks(plan.settings.trusted_proxies))
    max_body_bytes = plan.settings.max_body_bytes

    # The request event around the (traced) error answering around the gateway: bound once,
    # a call less per layer per request.
    traced = plan.tracing.wrap(answer_errors) if plan.tracing is not None else answer_errors
    dispatch: Handler = functools.partial(events, handler=traced)

    async def expect(request: web.Request) -> web.StreamResponse | None:
        # aiohttp's default echoes the header into its error and fails on non-UTF-8 bytes;
        # this one also refuses an oversized body before inviting the caller to send it.
        api = api_style_for_path(request.path)
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(ExpectationFailed(), api)
        if (request.content_length or 0) > max_body_bytes:
            response = error_response(BodyTooLarge(), api)
            response.force_close()
            return response
        if request.version >= (1, 1):
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the real response has not started yet
        return None

    route = app.router.add_route("*", "/{tail:.*}", dispatch, expect_handler=expect)
    # aiohttp's own 400s, and its 404 for targets that are not a path, in the caller's shape
    malformed.install(app, route)
    if plan.settings.http_frontend == "fast":
        # The forwarding routes served below web.Request, through the same `dispatch`.
        frontend.install(app, dispatch, lambda method, path: app[GATEWAY].forwards(method, path))


def settle_heap() -> None:
    """Once the gateway listens: what starting it built (the modules, the app and its parts,
    the pools) lives as long as the process, so the cyclic collector should not walk it again
    on every full collection (a hundred milliseconds each, on the request path). Collected
    once, then moved out of its reach (``gc.freeze``); what requests make is collected as
    before."""
    gc.collect()
    gc.freeze()


def outbound_session() -> aiohttp.ClientSession:
    """The session for calls to services other than the model server (the facilitator).

    Plain TCP whatever the upstream mode; TLS verified against the system's trust store as it
    is when the gateway starts (``SSL_CERT_FILE``/``SSL_CERT_DIR`` name a private CA).
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(
            ssl=ssl.create_default_context(), limit=OUTBOUND_CONNECTIONS
        ),
        timeout=aiohttp.ClientTimeout(total=None),  # each call sets its own (settler timeouts)
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    )


def admission_limits(settings: Settings) -> AdmissionLimits:
    return settings_view(
        settings,
        AdmissionLimits,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        ipv6_prefix=settings.ipv6_prefix_length,
    )


def configured_channels(settings: Settings) -> tuple[binding.ChannelTerms, ...]:
    """The channel terms a gateway with these settings binds, known without starting it: in
    chain mode the receiver authorizer is the gas key's address (``BatchChain``). Under a
    facilitator it is whatever the facilitator names at start, so nothing is known offline
    (``attest show`` then omits the channel terms, as it omits upto's facilitator)."""
    if settings.payment_mode != "chain" or CHANNEL_SCHEME not in settings.payment_schemes:
        return ()
    gas_key = settings.secret("gas_key")
    if gas_key is None:
        raise ConfigError("payment_mode chain needs gas_key or gas_key_file (PAYGATE_GAS_KEY)")
    try:
        authorizer = Account.from_key(gas_key.get_secret_value()).address
    except ValueError:  # as the gateway's start says it (assembly.settler_for)
        raise ConfigError("gas_key is not a valid private key") from None
    return channel_terms(
        payment_terms(settings),
        receiver_authorizer=authorizer,
        withdraw_delay=settings.batch_withdraw_delay,
    )


def attestation_config(
    settings: Settings,
    upto_extra: Mapping[str, Mapping[str, str]] | None = None,
    channels: Sequence[binding.ChannelTerms] = (),
) -> AttestationConfig:
    """What the attestation endpoints bind and how much they may cost (docs/ATTESTATION.md).
    ``upto_extra``: the upto facilitator per network, known once the payment step asked it;
    ``channels``: the batch-settlement channel terms, known once the scheme is bound."""
    kind = settings.attestation
    if kind == "auto":
        kind = "tpm" if settings.key_backend == "tpm" else "none"
    if kind == "tpm" and settings.key_backend != "tpm":
        raise ConfigError("attestation tpm needs key_backend tpm (PAYGATE_KEY_BACKEND=tpm)")
    if kind in binding.TEE_KINDS and settings.key_backend != "tee-memory":
        # The evidence vouches for the guest's memory: a key stored elsewhere is not covered.
        raise ConfigError(f"attestation {kind} needs key_backend tee-memory")
    terms = None
    if settings.payment_mode != "off":
        terms = payment_document(
            payment_terms(settings, upto_extra),
            price_policy(settings),
            token_pricing(settings),
            settings.payment_schemes,
            settings.max_tokens_cap,
            channels,
        )
    return AttestationConfig(
        kind=kind,
        models=(),  # filled in at start with the digests of the weights served
        payment=terms,
        gateway_version=gateway_version(),
        code_digest=code_digest(),
        max_concurrent=settings.attestation_max_concurrent,
        rate_per_minute=settings.attestation_rate_per_minute,
        global_rate_per_minute=settings.attestation_global_rate_per_minute,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        ipv6_prefix=settings.ipv6_prefix_length,
        retry_after_seconds=settings.retry_after_seconds,
        replica=settings.replica_id or default_replica_id(),  # as the ledger names this replica
    )


def tee_provider(settings: Settings, kind: str) -> EvidenceProvider | None:
    """The TEE's evidence interface for a TEE kind (None for tpm/none); missing: ConfigError."""
    if kind not in binding.TEE_KINDS:
        return None
    try:
        return open_provider(
            kind,
            configfs_root=str(settings.attestation_configfs_root),
            sev_guest_device=str(settings.attestation_sev_guest_device),
            nsm_device=str(settings.attestation_nsm_device),
        )
    except TeeUnavailable as exc:
        raise ConfigError(f"attestation {kind}: {exc}") from None


def gpu_provider(settings: Settings) -> GpuEvidenceProvider | None:
    """The GPU's evidence interface when ``gpu_evidence`` names one; missing: ConfigError."""
    if settings.gpu_evidence == "off":
        return None
    from enclave.attestation.gpu import NvmlProvider

    try:
        return NvmlProvider()
    except GpuUnavailable as exc:
        raise ConfigError(f"gpu_evidence {settings.gpu_evidence}: {exc}") from None


def reply_limits(settings: Settings) -> ReplyLimits:
    return ReplyLimits(
        max_sealed_reply_bytes=settings.max_sealed_reply_bytes,
        max_plain_reply_bytes=settings.max_plain_reply_bytes,
        settle_margin_seconds=settings.settle_margin_seconds,
    )


def server_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``web.run_app``/``AppRunner`` that enforce the header limits."""
    return {
        "max_line_size": settings.max_header_bytes,
        "max_field_size": settings.max_header_bytes,
        "max_headers": settings.max_headers,
        # A caller that goes away cancels its handler, which closes the upstream request.
        "handler_cancellation": True,
        # An answer given before the body was read (a 402 from the headers alone, a refused
        # upload): the rest of the body is read and dropped for at most this long before the
        # connection closes, so the caller reads the answer instead of a reset. No slot is held.
        "lingering_time": LINGERING_SECONDS,
    }
