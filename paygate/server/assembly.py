"""Part of the app factory: settings → the payment step's objects (terms, prices, settler,
settlement strategy, ledger, reconciler). With ``paygate.server.app``, the only server module
that reads :class:`~paygate.config.Settings`; everything it builds takes explicit arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping

import aiohttp

from paygate.config import ConfigError, Settings
from paygate.economics.alerts import AlertSink, WebhookAlerts
from paygate.economics.controls import Controls, Economics, controls_from
from paygate.economics.open_store import economics_store
from paygate.server.payments import NoPayments, PaymentStep, X402Payments
from paygate.server.ratelimit import MODEL_PREFIX, Rate, RateLimits, RateLimitTable
from paygate.upstream.engines import profile_for
from paygate.upstream.shaping import RequestShaper
from paygate.x402.bazaar import Discovery
from paygate.x402.chain import ChainSettler
from paygate.x402.chain_reader import ChainReader
from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.hooks import PaymentEvents
from paygate.x402.ledger import PaymentRecord, default_replica_id
from paygate.x402.ledger_base import Ledger
from paygate.x402.ledger_store import open_ledger
from paygate.x402.metering import TokenPrice, TokenPricing
from paygate.x402.networks import Asset, UnknownNetwork, resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms
from paygate.x402.pricing import PricePolicy
from paygate.x402.processor import PaymentProcessor
from paygate.x402.recovery import Recovery
from paygate.x402.retention import prune_forever
from paygate.x402.schemes import SCHEMES, Binding, Scheme
from paygate.x402.schemes.base import MIN_REMAINING_SECONDS
from paygate.x402.schemes.upto.offer import FACILITATOR_EXTRA, extra_for
from paygate.x402.settlement import SettleAfterReply, Settlement, SettleUpfront, VerifyOnly
from paygate.x402.settler import Settler, SettlerUnavailable
from paygate.x402.smartwallet import WalletVerifier

log = logging.getLogger("paygate.server")


def payment_terms(
    settings: Settings, upto_extra: Mapping[str, Mapping[str, str]] | None = None
) -> PaymentTerms:
    """The seller's terms from the settings; ConfigError names what is missing.
    ``upto_extra``: the `upto` requirement fields per network (see :func:`upto_terms`)."""
    if not settings.pay_to:
        raise ConfigError("payments need pay_to (PAYGATE_PAY_TO): the wallet that is paid")
    accepted = []
    for name in settings.network:
        try:
            network = resolve_network(name)
        except UnknownNetwork as exc:
            raise ConfigError(str(exc)) from None
        if settings.asset_address:
            asset = Asset(
                address=settings.asset_address,
                name=settings.asset_name or "",
                version=settings.asset_version or "",
                decimals=settings.asset_decimals,
            )
        elif network.usdc is not None:
            asset = network.usdc
        else:
            raise ConfigError(f"network {name!r} has no USDC in the table: set asset_address")
        accepted.append(Acceptance(network=network, asset=asset))
    if not accepted:
        raise ConfigError("payments need at least one network (PAYGATE_NETWORK)")
    return PaymentTerms(
        pay_to=settings.pay_to,
        accepted=tuple(accepted),
        max_timeout_seconds=settings.max_timeout_seconds,
        description=settings.payment_description,
        require_payment_identifier=settings.require_payment_identifier,
        upto_extra=upto_extra or {},
    )


async def upto_terms(settings: Settings, settler: Settler) -> dict[str, dict[str, str]]:
    """The `upto` requirement fields per CAIP-2 network: who may settle (the facilitator's
    address from its ``GET /supported``; in chain mode the gas key's address).

    Raises ConfigError — the gateway does not start — when the facilitator cannot be asked or
    does not support `upto` on a configured network.
    """
    if "upto" not in settings.payment_schemes:
        return {}
    networks = [a.network.caip2 for a in payment_terms(settings).accepted]
    if isinstance(settler, ChainSettler):
        return {n: extra_for(settler.address) for n in networks}
    assert isinstance(settler, FacilitatorSettler)
    try:
        kinds = await settler.supported()
    except SettlerUnavailable as exc:
        raise ConfigError(f"upto needs the facilitator's GET /supported: {exc}") from None
    extra: dict[str, dict[str, str]] = {}
    for network in networks:
        for kind in kinds:
            address = (kind.get("extra") or {}).get(FACILITATOR_EXTRA)
            if (
                kind.get("scheme") == "upto"
                and kind.get("network") == network
                and kind.get("x402Version") == 2
                and isinstance(address, str)
            ):
                extra[network] = extra_for(address)
                break
        else:
            raise ConfigError(
                f"the facilitator does not support upto on {network} (GET /supported)"
            )
    return extra


def rate_limits(settings: Settings, worker: int = 1) -> RateLimits | None:
    """The address and payer token buckets, or None when no limit is configured; with
    ``workers`` > 1, worker ``worker``'s share of each rate (paygate.server.ratelimit)."""
    per_ip = {
        key: Rate(limit.per_ip, limit.burst)
        for key, limit in settings.rate_limits.items()
        if limit.per_ip is not None
    }
    per_payer = {
        key: Rate(limit.per_payer, limit.burst)
        for key, limit in settings.rate_limits.items()
        if limit.per_payer is not None
    }
    if any(key.startswith(MODEL_PREFIX) for key in per_ip):
        raise ConfigError("rate_limits: a model's limit can be per_payer only (per_ip runs first)")
    table = RateLimitTable(per_ip=per_ip, per_payer=per_payer)
    if table.empty:
        return None
    warning = table.share_warning(settings.workers)
    if warning is not None and worker == 1:  # said once, not by every worker
        log.warning("%s", warning)
    return RateLimits(table.share(worker, settings.workers))


def token_pricing(settings: Settings) -> TokenPricing | None:
    """The token prices of the metered schemes (a scheme charging what a request used)."""
    metered = any(SCHEMES[name].metered for name in settings.payment_schemes)
    if not metered or not settings.token_prices:
        return None
    return TokenPricing(
        prices={
            model: TokenPrice(input=p.input, output=p.output, minimum=p.minimum)
            for model, p in settings.token_prices.items()
        },
        fallback=settings.usage_fallback,
    )


def request_shaper(settings: Settings) -> RequestShaper:
    """The engines' generation rules, the output cap and the options callers may send.

    With several upstreams, each model is shaped by the rules of the engine serving it; a
    name served by engines of different kinds is refused (ConfigError): its output limit would
    not have one meaning, and a failover could hand a priced body to an engine that reads
    another key."""
    entries = settings.upstream_entries()
    kinds: dict[str, str] = {}
    for entry in entries:
        for model in entry.models:
            if kinds.setdefault(model, entry.config.kind) != entry.config.kind:
                raise ConfigError(
                    f"upstreams: model {model!r} is served by engines of different kinds "
                    f"({kinds[model]}, {entry.config.kind}): one name, one engine kind"
                )
    return RequestShaper(
        profile_for(entries[0].config.kind),
        by_model={model: profile_for(kind) for model, kind in kinds.items()},
        cap=settings.max_tokens_cap,
        allowed_options=frozenset(settings.engine_options_allowed),
        running_usage=settings.running_usage,
        limits=settings.payment_mode != "off",
    )


def price_policy(settings: Settings) -> PricePolicy:
    return PricePolicy(
        default=settings.price,
        routes=dict(settings.route_prices),
        models=dict(settings.model_prices),
        per_million_tokens=settings.price_per_million_tokens,
        token_estimate=settings.token_estimate,
    )


def check_payment_settings(settings: Settings) -> None:
    """Refuse at startup, before anything listens, a payment mode that cannot work."""
    if settings.chain_batch_max > 1 and settings.payment_mode != "chain":
        # Only the gateway's own gas account batches: elsewhere the knob would do nothing.
        raise ConfigError("chain_batch_max > 1 needs payment_mode chain (PAYGATE_CHAIN_BATCH_MAX)")
    if settings.payment_mode == "off":
        return
    payment_terms(settings)
    if settings.payment_mode in ("facilitator", "verify-only") and not settings.facilitator_url:
        raise ConfigError(
            f"payment_mode {settings.payment_mode} needs facilitator_url (PAYGATE_FACILITATOR_URL)"
        )
    if settings.payment_mode in ("facilitator", "verify-only"):
        settings.facilitator_auth_provider()  # an unreadable file or key fails here, at start
    if settings.payment_mode == "chain":
        if not settings.chain_rpc_url:
            raise ConfigError("payment_mode chain needs chain_rpc_url (PAYGATE_CHAIN_RPC_URL)")
        if settings.secret("gas_key") is None:
            raise ConfigError("payment_mode chain needs gas_key or gas_key_file (PAYGATE_GAS_KEY)")


def settler_for(settings: Settings, session: aiohttp.ClientSession) -> Settler:
    if settings.payment_mode == "chain":
        gas_key = settings.secret("gas_key")
        assert gas_key is not None  # check_payment_settings ran first
        assert settings.chain_rpc_url is not None
        try:
            return ChainSettler(
                settings.chain_rpc_url,
                gas_key,
                timeout=settings.facilitator_timeout,
                settle_timeout=settings.settle_timeout,
                factories=settings.erc6492_factories,
                batch_window=settings.chain_batch_window_ms / 1000,
                batch_max=settings.chain_batch_max,
            )
        except ValueError:
            raise ConfigError("gas_key is not a valid private key") from None
    assert settings.facilitator_url is not None
    # With an RPC endpoint, the facilitator's word is checked on chain (see docs/PAYMENTS.md);
    # without one, an unknown outcome is flagged for review, never taken as paid.
    chain = (
        ChainReader(settings.chain_rpc_url, timeout=settings.facilitator_timeout)
        if settings.chain_rpc_url
        else None
    )
    return FacilitatorSettler(
        session,
        settings.facilitator_url,
        timeout=settings.facilitator_timeout,
        settle_timeout=settings.settle_timeout,
        chain=chain,
        auth=settings.facilitator_auth_provider(),
    )


def wallet_verifier(settings: Settings) -> WalletVerifier | None:
    """Contract wallets sign in through the RPC endpoint, when there is one (smartwallet)."""
    if not settings.chain_rpc_url:
        return None
    reader = ChainReader(settings.chain_rpc_url, timeout=settings.facilitator_timeout)
    return WalletVerifier(reader, settings.erc6492_factories)


def settlement_for(settings: Settings) -> Settlement:
    """When payments settle: chosen once here, never a string checked per request."""
    if settings.payment_mode == "verify-only":
        return VerifyOnly()
    if settings.settle_timing == "upfront":
        return SettleUpfront()
    return SettleAfterReply()


def x402_payments(
    settings: Settings,
    *,
    ledger: Ledger,
    settler: Settler,
    upto_extra: Mapping[str, Mapping[str, str]] | None = None,
    limits: RateLimits | None = None,
    events: PaymentEvents | None = None,
    economics: Economics | None = None,
    shaper: RequestShaper | None = None,
    clock: Callable[[], float] = time.time,
    bound: Mapping[str, Scheme] | None = None,
) -> X402Payments:
    processor = PaymentProcessor(
        bound=bound,
        clock=clock,
        economics=economics,
        events=events,
        terms=payment_terms(settings, upto_extra),
        ledger=ledger,
        settler=settler,
        settlement=settlement_for(settings),
        settle_on_disconnect=settings.settle_on_disconnect,
        schemes=tuple(dict.fromkeys(settings.payment_schemes)),
        payer_check=limits.check_payer if limits is not None else None,
        daily_budget=settings.payer_daily_budget,
        free_per_day=settings.free_requests_per_day,
        free_per_address=settings.free_requests_per_address_per_day,
        skew_seconds=settings.clock_skew_seconds,
        # Room to serve for a few seconds and still settle before the authorization expires.
        min_remaining_seconds=settings.settle_margin_seconds + MIN_REMAINING_SECONDS,
        retry_after_seconds=settings.retry_after_seconds,
        payment_identifier_ttl=settings.payment_identifier_ttl_seconds,
        wallets=wallet_verifier(settings),
    )
    return X402Payments(
        processor,
        price_policy(settings),
        public_url=settings.public_url,
        description=settings.payment_description,
        pricing=token_pricing(settings),
        batch_max_items=settings.batch_max_items,
        shaper=shaper if shaper is not None else request_shaper(settings),
        model_limits=any(
            key.startswith(MODEL_PREFIX) and limit.per_payer is not None
            for key, limit in settings.rate_limits.items()
        ),
        discovery=Discovery(service=settings.payment_description)
        if settings.bazaar_discovery
        else None,
    )


async def bound_schemes(
    settings: Settings, ledger: Ledger, replica: str, settler: Settler, events: object = None
) -> dict[str, Scheme]:
    """Each configured scheme bound to this gateway (``Scheme.bind``: a scheme with its own
    state, batch-settlement's channels, gets the ledger, the settler, the settings and where
    it reports — ``events``, the metrics; the others are the registry's as they are).
    ConfigError when one cannot start."""
    binding = Binding(
        ledger=ledger,
        settler=settler,
        replica=replica,
        network=payment_terms(settings).accepted[0].network.caip2,
        settings=settings,
        events=events,
    )
    bound: dict[str, Scheme] = {}
    for name in dict.fromkeys(settings.payment_schemes):
        try:
            bound[name] = await SCHEMES[name].bind(binding)
        except SettlerUnavailable as exc:
            raise ConfigError(f"{name} needs the facilitator: {exc}") from None
    return bound


def economics_controls(settings: Settings) -> Controls:
    """The token limits and budgets of the settings (paygate.economics)."""
    return controls_from(
        {key: rule.model_dump() for key, rule in settings.token_limits.items()},
        {key: rule.model_dump() for key, rule in settings.budgets.items()},
    )


def alert_sink(settings: Settings) -> WebhookAlerts | None:
    """The webhook alerts, or None when ``alert_webhook`` is not set."""
    if settings.alert_webhook is None:
        return None
    secret = settings.secret("alert_webhook_secret")
    if secret is None or not secret.get_secret_value():
        raise ConfigError(
            "alert_webhook needs alert_webhook_secret (or _file): the alerts are signed with it"
        )
    return WebhookAlerts(
        settings.alert_webhook.get_secret_value(),
        secret.get_secret_value().encode(),
        replica=settings.replica_id or default_replica_id(),
    )


@contextlib.asynccontextmanager
async def payment_step(
    settings: Settings,
    session: aiohttp.ClientSession,
    limits: RateLimits | None = None,
    events: PaymentEvents | None = None,
    alerts: AlertSink | None = None,
    on_limit_event: Callable[[str, bool], None] | None = None,
    shaper: RequestShaper | None = None,
) -> AsyncIterator[PaymentStep]:
    """The configured payment step, with its ledger, settler, reconciler and lease keeper.

    The ledger is ``ledger_url`` (PostgreSQL or SQLite) or the SQLite file at ``ledger_path``,
    opened as this replica (``replica_id``) with ``lease_seconds`` leases (docs/SCALING.md).
    At start, before serving: reservations this replica's previous run left are released (and
    those of any replica whose lease ran out), and its unfinished settlements are claimed;
    the reconciler finishes those in the background, then every
    ``reconcile_interval_seconds`` claims and finishes what nobody holds. The keeper renews
    this process's leases every third of ``lease_seconds``.
    """
    if settings.payment_mode == "off":
        yield NoPayments()
        return
    location = settings.ledger_location()
    replica = settings.replica_id or default_replica_id()
    ledger = await open_ledger(
        location,
        replica=replica,
        lease_seconds=settings.lease_seconds,
        pool_size=settings.ledger_pool_size,
    )
    log.info("payment ledger %s, replica %s", location.describe(), replica)
    settler = settler_for(settings, session)
    try:
        upto_extra = await upto_terms(settings, settler)
        store = economics_store(ledger)
        if isinstance(alerts, WebhookAlerts):
            alerts.store = store  # alerts are claimed in the shared ledger: one per event
        controls = economics_controls(settings)
        economics = (
            None
            if controls.empty
            else Economics(controls, store, alerts=alerts, on_event=on_limit_event)
        )
        bound = await bound_schemes(settings, ledger, replica, settler, events)
        payments = x402_payments(
            settings,
            ledger=ledger,
            settler=settler,
            bound=bound,
            upto_extra=upto_extra,
            limits=limits,
            events=events,
            economics=economics,
            shaper=shaper,
        )
        processor = payments.processor
        await processor.load_signin_key()
        recovery = processor.recovery
        released = await recovery.release_abandoned(own=True)
        if released:
            log.info("released %d reservations left by an earlier run", released)
        adopted = await recovery.adopt_own()
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(
                _reconcile_forever(
                    recovery,
                    interval=settings.reconcile_interval_seconds,
                    busy_for=settings.settle_timeout + settings.facilitator_timeout,
                    adopted=adopted,
                )
            ),
            loop.create_task(_keep_leases(recovery, interval=settings.lease_seconds / 3)),
            loop.create_task(
                prune_forever(ledger, interval=settings.ledger_prune_interval_seconds)
            ),
        ]
        # What each scheme runs while the gateway serves (batch-settlement's claim loop).
        tasks += [loop.create_task(task()) for scheme in bound.values() for task in scheme.tasks()]
        try:
            yield payments
        finally:
            tasks[0].cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await tasks[0]
            await payments.close(settings.shutdown_grace_seconds)
            for task in tasks[1:]:  # after the drain: settlements still running keep their leases
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    finally:
        await settler.close()
        await ledger.close()


async def _reconcile_forever(
    recovery: Recovery,
    *,
    interval: float,
    busy_for: float,
    adopted: list[PaymentRecord],
) -> None:
    min_age = 0.0  # the first pass takes everything unowned, and what this replica adopted
    while True:
        try:
            touched = await recovery.reconcile_once(min_age=min_age, adopted=adopted)
            if touched:
                log.info("reconciled %d payments", touched)
        except Exception as exc:  # keep reconciling: one bad pass must not end the loop
            log.error("reconcile pass failed: %s", type(exc).__name__)
        # Later passes leave a let-go pending settlement alone for a while before asking again.
        min_age, adopted = busy_for, []
        await asyncio.sleep(interval)


async def _keep_leases(recovery: Recovery, *, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await recovery.renew_leases()
        except Exception as exc:  # keep renewing: a passing ledger failure must not end it
            log.error("lease renewal failed: %s", type(exc).__name__)
