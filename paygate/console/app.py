"""The console's aiohttp application: sign-in, the pages, the review actions.

It runs beside the gateway in the same process (its own listener, its own ledger connection
under the replica name ``<replica>/console``) and reads the gateway's live objects — the model
server's monitor, the attestation service, the payment processor — from the gateway app at
request time. Payments come from the shared ledger, so every replica's console shows them all;
the model server and trust pages show this replica's.

Every page is rendered on the server (Jinja2, autoescaped) and works without JavaScript; the
one script only offers a browser wallet's signature. Each action writes one audit line
(``paygate.console.audit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import aiohttp_jinja2
import jinja2
from aiohttp import web

from paygate.config import Settings
from paygate.console import auth
from paygate.console.charts import bar_chart
from paygate.economics.open_store import economics_store
from paygate.economics.store import (
    EconomicsStore,
    PaymentFilter,
    percentile,
)
from paygate.server.ratelimit import Rate, TokenBuckets
from paygate.x402.ledger import (
    REVIEW_PREFIX,
    LedgerError,
    PaymentState,
    check_error,
    default_replica_id,
)
from paygate.x402.ledger_base import Ledger
from paygate.x402.ledger_store import open_ledger
from paygate.x402.networks import resolve_network
from paygate.x402.settlements import PENDING
from paygate.x402.siwx import SiwxProof

log = logging.getLogger("paygate.console")
audit = logging.getLogger("paygate.console.audit")

LEDGER = web.AppKey("console_ledger", Ledger)  # type: ignore[type-abstract]
STORE = web.AppKey("console_store", EconomicsStore)  # type: ignore[type-abstract]
SESSION = web.RequestKey("console_session", auth.Session)
STATIC = Path(__file__).parent / "static"
USDC_DECIMALS = 6
_HEX_ID = frozenset("0123456789abcdef")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
FormHandler = Callable[[web.Request, Any], Awaitable[web.StreamResponse]]  # a POST and its form
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; script-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # A login link carries its token in the path: never sent on to another site.
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
PUBLIC = ("/signin", "/login", "/static/", "/favicon.ico")


def usdc(amount: int | None) -> str:
    if amount is None:
        return "-"
    return f"{Decimal(amount).scaleb(-USDC_DECIMALS):.{USDC_DECIMALS}f}"


def when(stamp: float | None) -> str:
    if stamp is None:
        return "-"
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def console_secret(settings: Settings) -> bytes:
    secret = settings.secret("console_secret")
    if secret is not None and secret.get_secret_value():
        return secret.get_secret_value().encode()
    # No configured secret: sessions hold for this process only (docs/CONSOLE.md).
    log.warning("console_secret is not set: sessions end when this process restarts")
    return secrets.token_bytes(32)


def build_console(settings: Settings, gateway: web.Application) -> web.Application:
    """The console app for ``settings``; ``gateway`` is the running gateway app it reads."""
    sessions = auth.Sessions(console_secret(settings), seconds=settings.console_session_seconds)
    wallets = {w.lower() for w in settings.console_wallets}
    signins = TokenBuckets(Rate(per_minute=10, burst=5))
    replica = settings.replica_id or default_replica_id()
    chain_id = _chain_id(settings)
    app = web.Application(client_max_size=64 * 1024, middlewares=[_guard(sessions)])
    env = aiohttp_jinja2.setup(
        app,
        loader=jinja2.PackageLoader("paygate.console", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["usdc"] = usdc
    env.filters["when"] = when
    routes = web.RouteTableDef()  # each page's route stands on its handler

    async def ledger_ctx(app: web.Application) -> AsyncIterator[None]:
        ledger = await open_ledger(
            settings.ledger_location(),
            replica=f"{replica}/console",
            lease_seconds=settings.lease_seconds,
            pool_size=2,
        )
        app[LEDGER] = ledger
        app[STORE] = economics_store(ledger)
        yield
        await ledger.close()

    app.cleanup_ctx.append(ledger_ctx)

    def page(request: web.Request, name: str, **context: Any) -> web.Response:
        session = request.get(SESSION)
        context.setdefault("title", name.removesuffix(".html"))
        return aiohttp_jinja2.render_template(
            name,
            request,
            {
                "session": session,
                "csrf": sessions.csrf(session) if session else "",
                "replica": replica,
                "path": request.path,
                "next": _safe_next(request.query.get("next")),
                **context,
            },
        )

    def client(request: web.Request) -> str:
        return request.remote or "unknown"

    def limited(request: web.Request) -> web.Response | None:
        if signins.take(client(request)).allowed:
            return None
        audit.warning("console sign-in rate-limited from %s", client(request))
        response = page(
            request,
            "signin.html",
            error="Too many sign-in attempts; wait a minute.",
            **_pre(request),
        )
        response.set_status(429)
        response.headers["Retry-After"] = "60"
        return response

    def _pre(request: web.Request | None = None) -> dict[str, Any]:
        # The double-submit token: the browser's own while it lasts (several tabs, and a
        # request in between, must not invalidate the form being filled in).
        held = request.cookies.get(auth.PRE_COOKIE, "") if request is not None else ""
        pre = held if len(held) == 32 and set(held) <= _HEX_ID else secrets.token_hex(16)
        return {"pre": pre, "message": None, "fields": None, "wallet": ""}

    def strict_cookie(response: web.StreamResponse, name: str, value: str, seconds: float) -> None:
        # Never readable by scripts, never sent cross-site, HTTPS-only when served over TLS.
        response.set_cookie(
            name,
            value,
            max_age=int(seconds),
            httponly=True,
            samesite="Strict",
            secure=settings.console_tls,
            path="/",
        )

    def with_pre(response: web.Response, pre: str) -> web.Response:
        strict_cookie(response, auth.PRE_COOKIE, pre, auth.NONCE_SECONDS)
        return response

    def signin_proof(request: web.Request, address: str, nonce: str, issued_at: float) -> SiwxProof:
        """A sign-in message's fields: for console_url when set, else the request's host."""
        if settings.console_url:
            parts = urlsplit(settings.console_url)
            domain, uri = parts.netloc, f"{parts.scheme}://{parts.netloc}"
        else:
            scheme = "https" if settings.console_tls else "http"
            domain, uri = request.host, f"{scheme}://{request.host}"
        return auth.signin_proof(
            domain=domain,
            uri=uri,
            address=address,
            chain_id=chain_id,
            nonce=nonce,
            issued_at=issued_at,
        )

    def signed_in(request: web.Request, operator: str, method: str) -> web.Response:
        cookie, _session = sessions.issue(operator, method, time.time())
        audit.info("console sign-in: %s by %s from %s", operator, method, client(request))
        target = _safe_next(request.query.get("next"))
        response = web.HTTPSeeOther(target)
        strict_cookie(response, auth.COOKIE, cookie, sessions.seconds)
        response.del_cookie(auth.PRE_COOKIE, path="/")
        raise response

    def signin_post(handler: FormHandler) -> Handler:
        """A sign-in POST: rate-limited and its double-submit token checked before ``handler``
        has the form."""

        async def checked(request: web.Request) -> web.StreamResponse:
            refused = limited(request)
            if refused is not None:
                return refused
            form = await request.post()
            if not pre_ok(request, form):
                return _refuse_csrf(request, page)
            return await handler(request, form)

        return checked

    def signin_refused(request: web.Request, error: str) -> web.Response:
        context = _pre(request)
        response = page(request, "signin.html", error=error, **context)
        response.set_status(403)
        return with_pre(response, context["pre"])

    def pre_ok(request: web.Request, form: Any) -> bool:
        cookie = request.cookies.get(auth.PRE_COOKIE, "")
        return bool(cookie) and secrets.compare_digest(cookie, str(form.get("pre", "")))

    # --- sign-in ----------------------------------------------------------------------------

    @routes.get("/signin")
    async def signin(request: web.Request) -> web.Response:
        context = _pre(request)
        wallet = request.query.get("wallet", "").strip()
        if wallet:
            refused = limited(request)
            if refused is not None:
                return refused
            if not _is_address(wallet):
                context["error"] = "That is not a 0x-prefixed 20-byte address."
            else:
                nonce = secrets.token_hex(12)
                await request.app[STORE].put_login(
                    auth.token_hash("nonce", nonce), time.time() + auth.NONCE_SECONDS
                )
                proof = signin_proof(request, wallet, nonce, time.time())
                context.update(
                    wallet=proof.address,
                    message=auth.signin_message(proof),
                    fields={
                        "address": proof.address,
                        "nonce": nonce,
                        "issued_at": proof.issued_at,
                    },
                )
        return with_pre(page(request, "signin.html", **context), context["pre"])

    @routes.post("/signin")
    @signin_post
    async def signin_wallet(request: web.Request, form: Any) -> web.Response:
        address = str(form.get("address", ""))
        nonce = str(form.get("nonce", ""))
        signature = str(form.get("signature", "")).strip()
        error = None
        if not _is_address(address) or not nonce.isalnum() or len(nonce) > 64:
            error = "The sign-in form is incomplete."
        elif address.lower() not in wallets:
            error = "This wallet may not sign in here."
        if error is None:
            try:
                issued = datetime.fromisoformat(
                    str(form.get("issued_at", "")).replace("Z", "+00:00")
                ).timestamp()
            except ValueError:
                issued = 0.0
            proof = signin_proof(request, address, nonce, issued)
            message = auth.signin_message(proof)
            if issued + auth.NONCE_SECONDS < time.time():
                error = "The sign-in message has expired; ask for a new one."
            elif not await _wallet_signed(settings, proof.address, message, signature):
                error = "The signature is not this wallet's."
            elif not await request.app[STORE].take_login(auth.token_hash("nonce", nonce)):
                error = "This sign-in message was already used or has expired."
        if error is not None:
            audit.warning(
                "console wallet sign-in refused for %s from %s: %s",
                address[:42],
                client(request),
                error,
            )
            return signin_refused(request, error)
        return signed_in(request, to_checksum(address), "wallet")

    @routes.get("/login/{token}")
    async def login_link(request: web.Request) -> web.Response:
        # A GET only shows a button: link previews and scanners must not use the token up.
        context = _pre(request)
        token = request.match_info["token"]
        return with_pre(page(request, "login.html", token=token, **context), context["pre"])

    @routes.post("/login")
    @signin_post
    async def login_post(request: web.Request, form: Any) -> web.Response:
        token = str(form.get("token", ""))
        if 0 < len(token) <= 128 and await request.app[STORE].take_login(
            auth.token_hash("link", token)
        ):
            return signed_in(request, "login-link", "link")
        audit.warning("console login link refused from %s", client(request))
        return signin_refused(request, "This login link was used or has expired.")

    @routes.post("/signout")
    async def signout(request: web.Request) -> web.Response:
        session = request[SESSION]
        audit.info("console sign-out: %s", session.operator)
        response = web.HTTPSeeOther("/signin")
        response.del_cookie(auth.COOKIE, path="/")
        raise response

    # --- pages ----------------------------------------------------------------------------

    @routes.get("/")
    async def overview(request: web.Request) -> web.Response:
        store = request.app[STORE]
        now = time.time()
        today = now - now % 86_400
        windows = {"today": today, "7 days": now - 7 * 86_400, "30 days": now - 30 * 86_400}
        earnings = {
            label: {
                "scheme": await store.earnings(since=since, group="scheme"),
                "model": await store.earnings(since=since, group="model"),
            }
            for label, since in windows.items()
        }
        totals = {label: sum(r.settled for r in e["scheme"]) for label, e in earnings.items()}
        days = await request.app[LEDGER].earnings(since=now - 30 * 86_400, by="day")
        by_day = {d.key: d.settled for d in days}
        series = [
            time.strftime("%Y-%m-%d", time.gmtime(today - back * 86_400))
            for back in range(29, -1, -1)
        ]
        chart = bar_chart([(day, float(usdc(by_day.get(day, 0)))) for day in series], unit=" USDC")
        latencies = await store.settle_latencies(since=now - 86_400)
        states = await store.count_states(since=now - 86_400)
        review = await store.search(PaymentFilter(review=True), limit=100)
        events = await store.limit_events(since=now - 86_400, limit=10)
        upstream = _upstream_status(gateway)
        alerts = []
        if review:
            alerts.append(f"{len(review)} payment(s) need review")
        if upstream.get("state") in ("down", "restarting"):
            alerts.append(f"the model server is {upstream['state']} on this replica")
        if [e for e in events if e.enforced]:
            alerts.append("limits refused requests in the last 24 hours")
        return page(
            request,
            "overview.html",
            title="Overview",
            earnings=earnings,
            totals=totals,
            chart=chart,
            p50=percentile(latencies, 0.5),
            p95=percentile(latencies, 0.95),
            settled_count=len(latencies),
            states=states,
            requests=sum(states.values()),
            alerts=alerts,
            events=events,
        )

    @routes.get("/payments")
    async def payments(request: web.Request) -> web.Response:
        query = request.query
        errors: list[str] = []
        where = _filter(query, errors)
        records = await request.app[STORE].search(where, limit=_int(query.get("limit"), 100))
        return page(
            request,
            "payments.html",
            title="Payments",
            records=records,
            query=query,
            errors=errors,
            states=[s.value for s in PaymentState],
        )

    @routes.get("/payments/{id}")
    async def payment(request: web.Request) -> web.Response:
        payment_id = request.match_info["id"]
        record = None
        if len(payment_id) == 32 and set(payment_id) <= _HEX_ID:
            record = await request.app[LEDGER].get(payment_id)
        if record is None:
            raise web.HTTPNotFound(text="no such payment")
        history = await request.app[LEDGER].history(record.id)
        receipt = {
            "success": record.state is PaymentState.SETTLED,
            "transaction": record.transaction,
            "network": record.network,
            "payer": record.payer,
            "amount": str(
                record.settled_amount if record.settled_amount is not None else record.owed
            ),
            "errorReason": record.error,
        }
        return page(
            request,
            "payment.html",
            title=f"Payment {record.id}",
            record=record,
            history=history,
            receipt=json.dumps(receipt, indent=2),
            review_reason=(record.error or "").removeprefix(REVIEW_PREFIX),
            network_name=_network_name(record.network),
        )

    @routes.get("/review")
    async def review(request: web.Request) -> web.Response:
        records = await request.app[STORE].search(PaymentFilter(review=True), limit=200)
        return page(
            request,
            "review.html",
            title="Review queue",
            records=records,
            done=request.query.get("done", ""),
            reasons={r.id: (r.error or "").removeprefix(REVIEW_PREFIX) for r in records},
        )

    @routes.post("/review/{id}")
    async def review_action(request: web.Request) -> web.Response:
        session = request[SESSION]
        form = await request.post()
        payment_id = request.match_info["id"]
        action = str(form.get("action", ""))
        record = None
        if len(payment_id) == 32 and set(payment_id) <= _HEX_ID:
            record = await request.app[LEDGER].get(payment_id)
        if record is None or not record.needs_review:
            raise web.HTTPConflict(text="this payment is not waiting for review")
        ledger = request.app[LEDGER]
        if action == "fail":
            reason = check_error(str(form.get("reason", "")).strip()) or ""
            if not reason:
                raise web.HTTPBadRequest(text="say why the payment failed")
            await ledger.transition(
                record.id, PaymentState.FAILED, error=f"operator: {reason}"[:200]
            )
            audit.info(
                "console review: %s marked payment %s failed (%s)",
                session.operator,
                record.id,
                reason,
            )
        elif action == "prove":
            # Flagged → pending: the reconciler asks the chain again (when it can), and flags
            # it again if the outcome still cannot be proven.
            await ledger.transition(record.id, PaymentState.SETTLING, error=PENDING)
            audit.info(
                "console review: %s asked to prove payment %s again", session.operator, record.id
            )
            processor = _processor(gateway)
            if processor is not None:
                with contextlib.suppress(LedgerError):
                    await asyncio.wait_for(
                        processor.recovery.reconcile_once(min_age=0.0), timeout=30
                    )
        else:
            raise web.HTTPBadRequest(text="unknown action")
        raise web.HTTPSeeOther(f"/review?done={quote(action)}")

    @routes.get("/upstream")
    async def upstream(request: web.Request) -> web.Response:
        return page(
            request,
            "upstream.html",
            title="Model servers",
            status=_upstream_status(gateway),
            models=_upstream_models(gateway),
            kind=settings.upstream_kind,
            mode=settings.upstream_mode,
        )

    @routes.get("/trust")
    async def trust(request: web.Request) -> web.Response:
        return page(request, "trust.html", title="Trust", facts=_trust(gateway))

    @routes.get("/limits")
    async def limits(request: web.Request) -> web.Response:
        store = request.app[STORE]
        now = time.time()
        day = now - now % 86_400
        month_start = datetime.fromtimestamp(now, UTC).replace(
            day=1, hour=0, minute=0, second=0, microsecond=0
        )
        return page(
            request,
            "limits.html",
            title="Limits and budgets",
            rate_limits=settings.rate_limits,
            token_limits=settings.token_limits,
            budgets=settings.budgets,
            daily_budget=settings.payer_daily_budget,
            minute=await store.tokens(since=now - 60),
            token_payers=await store.top_token_payers(since=now - 3600, limit=10),
            spend_day=await store.top_spenders(since=day, limit=10),
            spend_month=await store.top_spenders(since=month_start.timestamp(), limit=10),
            events=await store.limit_events(since=now - 7 * 86_400, limit=50),
        )

    app.add_routes(routes)
    app.router.add_static("/static/", STATIC, show_index=False, follow_symlinks=False)
    return app


def _guard(sessions: auth.Sessions) -> Any:
    """Sessions, CSRF and the security headers, for every request."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await _guarded(request, handler, sessions)
        except web.HTTPException as exc:  # redirects and refusals carry the headers too
            for name, value in SECURITY_HEADERS.items():
                exc.headers.setdefault(name, value)
            raise
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return guard


async def _guarded(
    request: web.Request, handler: Handler, sessions: auth.Sessions
) -> web.StreamResponse:
    session = sessions.read(request.cookies.get(auth.COOKIE), time.time())
    public = request.path.startswith(PUBLIC)
    if session is None and not public:
        if request.method != "GET":
            raise web.HTTPForbidden(text="sign in first")
        target = request.path_qs if request.path != "/" else "/"
        raise web.HTTPSeeOther("/signin?next=" + quote(target, safe=""))
    if session is not None:
        request[SESSION] = session
        if request.method == "POST" and not public:
            form = await request.post()
            if not sessions.check_csrf(session, form.get("csrf")):  # type: ignore[arg-type]
                audit.warning(
                    "console: %s %s refused: missing or wrong CSRF token (%s)",
                    request.method,
                    request.path,
                    session.operator,
                )
                raise web.HTTPForbidden(text="this form is stale or forged (CSRF): reload the page")
    return await handler(request)


def _refuse_csrf(request: web.Request, page: Any) -> web.Response:
    audit.warning("console: sign-in form refused: CSRF token missing or wrong")
    response = page(
        request,
        "signin.html",
        error="This form is stale; start again.",
        pre="",
        message=None,
        fields=None,
        wallet="",
    )
    response.set_status(403)
    return response


def _safe_next(target: str | None) -> str:
    """Only a path on this console (never another origin: no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _is_address(text: str) -> bool:
    return (
        len(text) == 42
        and text.startswith("0x")
        and all(c in "0123456789abcdefABCDEF" for c in text[2:])
    )


def to_checksum(address: str) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


def _int(text: str | None, default: int) -> int:
    return int(text) if text and text.isdigit() and 0 < int(text) <= 1000 else default


def _filter(query: Any, errors: list[str]) -> PaymentFilter:
    state = None
    if query.get("state"):
        try:
            state = PaymentState(query["state"])
        except ValueError:
            errors.append("unknown state")
    since = _date(query.get("since"), errors)
    until = _date(query.get("until"), errors)
    payer = query.get("payer") or None
    if payer is not None:
        if _is_address(payer):
            payer = to_checksum(payer)
        else:
            errors.append("payer must be an address")
            payer = "-"
    return PaymentFilter(
        state=state,
        review=query.get("review") == "1",
        payer=payer,
        scheme=query.get("scheme") or None,
        model=(query.get("model") or None),
        since=since,
        until=until,
    )


def _date(text: str | None, errors: list[str]) -> float | None:
    if not text:
        return None
    try:
        return datetime.strptime(text[:16], "%Y-%m-%d").replace(tzinfo=UTC).timestamp()
    except ValueError:
        errors.append("dates are YYYY-MM-DD")
        return None


def _chain_id(settings: Settings) -> int:
    try:
        return int(resolve_network(settings.network[0]).caip2.split(":")[1])
    except Exception:  # an unknown network name: sign in on mainnet's id
        return 1


def _network_name(caip2: str) -> str:
    try:
        return resolve_network(caip2).name
    except Exception:
        return caip2


def _upstream_status(gateway: web.Application) -> dict[str, Any]:
    from paygate.server.app import UPSTREAM

    service = gateway.get(UPSTREAM)
    return dict(service.status()) if service is not None else {"state": "not started"}


def _upstream_models(gateway: web.Application) -> list[dict[str, str]]:
    from paygate.server.app import UPSTREAM

    service = gateway.get(UPSTREAM)
    return service.models_document() if service is not None else []


def _processor(gateway: web.Application) -> Any:
    from paygate.server.app import PAYMENTS

    step = gateway.get(PAYMENTS)
    return getattr(step, "processor", None)


def _trust(gateway: web.Application) -> dict[str, Any]:
    from paygate.server.app import ATTESTATION, KEY

    facts: dict[str, Any] = {}
    key = gateway.get(KEY)
    if key is not None:
        info = key.info()
        facts["key backend"] = info.backend
        facts["key persistent"] = "yes" if info.persistent else "no"
        facts["public key (sha256)"] = (
            "sha256:" + __import__("hashlib").sha256(info.public_key).hexdigest()
        )
        for name, value in sorted(info.details.items()):
            facts[f"key {name}"] = value
    service = gateway.get(ATTESTATION)
    if service is not None:
        config = service._config
        facts["evidence kind"] = config.kind
        facts["gateway version"] = config.gateway_version
        facts["code digest"] = config.code_digest
        facts["configuration digest"] = service.config_digest().hex()
        for model in config.models:
            facts[f"model {model.name}"] = model.digest
        if config.payment is not None:
            facts["paid to"] = config.payment.pay_to
            facts["networks"] = ", ".join(a.network for a in config.payment.accepts)
            facts["schemes"] = ", ".join(config.payment.schemes)
            facts["default price"] = config.payment.price
        if config.log is not None:
            facts["transparency log"] = config.log.origin
            facts["log key"] = config.log.key
    facts.setdefault("evidence kind", "not started")
    facts.setdefault("transparency log", "not configured on this appliance")
    return facts


async def _wallet_signed(settings: Settings, wallet: str, message: str, signature: str) -> bool:
    """An EOA's signature, else (with an RPC) the contract wallet's EIP-1271 answer."""
    if len(signature) > 4096:
        return False
    signer = auth.recover(message, signature)
    if signer is not None and signer.lower() == wallet.lower():
        return True
    if not settings.chain_rpc_url:
        return False
    try:
        call = auth.is_valid_signature_call(wallet, auth.message_hash(message), signature)
    except ValueError:
        return False
    request = {"jsonrpc": "2.0", "id": 1, "method": "eth_call", "params": [call, "latest"]}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5), trust_env=False) as s,
            s.post(settings.chain_rpc_url, json=request) as response,
        ):
            answer = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    result = answer.get("result") if isinstance(answer, dict) else None
    return isinstance(result, str) and result[:10].lower() == auth.EIP1271_MAGIC
