"""``paygate doctor``: every check with pass/fail and a one-line fix; exit 1 on any failure.

Checks run against the same settings ``paygate serve`` would use (``--config``, environment).
Each is independent and bounded by a timeout; none prints a secret (only setting names,
paths, modes, chain ids and HTTP statuses). ``--json`` prints a list of
``{check, ok, detail, fix}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import aiohttp

from enclave import EnclaveError
from paygate.cli.options import add_config
from paygate.config import ConfigError, Settings, load_settings
from paygate.errors import PaygateError
from paygate.keys import open_key_backend
from paygate.redact import redact_url
from paygate.x402.networks import UnknownNetwork, resolve_network

PROBE_TIMEOUT = 5.0  # seconds per network check
PROBE_BODY_BYTES = 256 * 1024  # of an answer read
_CHAIN_ID = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
# Past this, authorizations look expired or not yet valid to the facilitator and the chain
# (validAfter/validBefore are checked against block time), and receipts carry a wrong time.
CLOCK_SKEW_LIMIT = 30.0  # seconds


@dataclass(frozen=True, slots=True)
class Check:
    check: str
    ok: bool
    detail: str
    fix: str = ""


def register(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="check the configuration and everything it names")
    add_config(doctor)
    doctor.add_argument("--json", action="store_true", help="a list of {check, ok, detail, fix}")
    doctor.set_defaults(run=_doctor)


def _doctor(args: argparse.Namespace) -> int:
    checks = asyncio.run(run_checks(getattr(args, "config", None)))
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        for c in checks:
            print(f"{'PASS' if c.ok else 'FAIL'}  {c.check:12} {c.detail}")
            if not c.ok and c.fix:
                print(f"      {'':12} fix: {c.fix}")
    return 0 if all(c.ok for c in checks) else 1


class CheckFailed(PaygateError):
    """``CheckFailed(detail, fix)``: a doctor check found ``detail``; ``fix`` is the one line
    that says what to do. Raised by a probe and made its Check by the runner."""

    message = "the check failed"
    code = "check_failed"

    def check(self, name: str) -> Check:
        detail, fix = self.args
        return Check(name, False, detail, fix)


# A probe: the detail of a check passed, None when it does not apply, or CheckFailed.
Probe = Callable[[Settings], Awaitable[str | None]]


async def run_checks(config: Path | None) -> list[Check]:
    try:
        settings = load_settings(config)
    except ConfigError as exc:
        return [Check("config", False, str(exc), "correct the setting named above")]
    checks = [Check("config", True, f"valid ({config or 'environment and defaults'})")]
    for name in PROBES:
        found = await run_check(name, settings)
        if found is not None:
            checks.append(found)
    return checks


async def run_check(name: str, settings: Settings) -> Check | None:
    """The check ``name`` (one of PROBES) against ``settings``; None when it does not apply."""
    try:
        detail = await PROBES[name](settings)
    except CheckFailed as failed:
        return failed.check(name)
    except Exception as exc:  # one broken check must not hide the others
        return Check(name, False, f"check failed: {type(exc).__name__}", "see the detail")
    return None if detail is None else Check(name, True, detail)


async def _key_files(settings: Settings) -> str | None:
    if settings.key_backend == "pkcs11":
        return None
    path = settings.key_file if settings.key_backend == "software" else settings.tpm_key_dir
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise CheckFailed(f"{path}: {exc.strerror}", "paygate keys create") from None
    if mode & 0o077:
        wanted = "0600" if path.is_file() else "0700"
        raise CheckFailed(f"{path} is mode {mode:04o}", f"chmod {wanted} {path}")
    return f"{path} mode {mode:04o}"


async def _key(settings: Settings) -> str:
    def use() -> str:
        key = open_key_backend(settings)
        try:
            key.ecdh(key.public_key)  # a real operation: the token or TPM answers
            return key.info().backend
        finally:
            key.close()

    try:
        backend = await asyncio.wait_for(asyncio.to_thread(use), PROBE_TIMEOUT * 2)
    except (EnclaveError, ConfigError, OSError, TimeoutError) as exc:
        code = getattr(exc, "code", type(exc).__name__)
        raise CheckFailed(
            f"{settings.key_backend} key unusable ({code})",
            "check key_file/pkcs11_*/tpm_* and the secret; paygate keys show",
        ) from None
    return f"{backend} key answers ECDH"


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    date: str | None  # the Date header
    at: float  # local time when the headers arrived
    body: bytes  # at most PROBE_BODY_BYTES

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None


async def _probe(
    method: str,
    url: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
    redirects: bool = False,
) -> _Answer:
    """One bounded exchange (PROBE_TIMEOUT, PROBE_BODY_BYTES), no proxy from the environment."""
    timeout = aiohttp.ClientTimeout(total=PROBE_TIMEOUT)
    async with (
        aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
        session.request(
            method, url, json=body, headers=headers, allow_redirects=redirects
        ) as response,
    ):
        at = time.time()
        raw = await response.content.read(PROBE_BODY_BYTES)
    return _Answer(response.status, response.headers.get("Date"), at, raw)


async def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    answer = await _probe("GET", url, headers=headers)
    return answer.status, answer.json()


async def _upstream(settings: Settings) -> str | None:
    if settings.upstream_mode == "container":
        return None  # its readiness is the container's: paygate upstream status
    from paygate.upstream.service import auth_headers, health_url

    config = settings.upstream()
    try:
        status, _ = await _get(health_url(config), auth_headers(config.api_key))
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CheckFailed(
            f"{settings.upstream_url} unreachable ({type(exc).__name__})",
            "start the model server or correct upstream_url",
        ) from None
    if status >= 400:
        fix = await _kind_fix(settings) or "see its logs"
        raise CheckFailed(f"readiness answered HTTP {status}", fix)
    return f"{settings.upstream_url} ready"


async def _kind_fix(settings: Settings) -> str | None:
    """When the server at upstream_url is another kind than upstream_kind: which to set."""
    from paygate.upstream.discovery import probe_url

    found = await probe_url(settings.upstream_url, timeout=PROBE_TIMEOUT)
    if found is None or found.kind in ("http", settings.upstream_kind):
        return None
    where = redact_url(settings.upstream_url)
    return f'the server at {where} answers like {found.kind}: set upstream_kind = "{found.kind}"'


async def _model(settings: Settings) -> str | None:
    """The configured model is listed by the upstream and its weights have the expected digest.

    Attach mode only: in container mode the model server (and Ollama's manifests) exist once
    ``paygate serve`` has started the containers, which checks the digests itself.
    """
    if settings.upstream_mode == "container":
        return None
    from paygate.upstream.engines import profile_for
    from paygate.upstream.errors import UpstreamError
    from paygate.upstream.service import auth_headers, base_url, check_digests, served_digests

    config = settings.upstream()
    profile = profile_for(config.kind)
    try:
        status, listing = await _get(
            base_url(config) + profile.models_path, auth_headers(config.api_key)
        )
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CheckFailed(
            f"model list unreachable ({type(exc).__name__})",
            "start the model server or correct upstream_url",
        ) from None
    listed = profile.model_names(listing) if status < 400 else []
    wanted = sorted({*config.expected_model_digests, *filter(None, [config.model_name])})
    absent = [name for name in wanted if name not in listed]
    if not listed or absent:
        what = ", ".join(absent) if absent else "any model"
        raise CheckFailed(
            f"the upstream does not list {what} (HTTP {status}, lists {len(listed)})",
            await _kind_fix(settings)
            or "pull or load the model on the server, or correct upstream_model_name",
        )
    try:
        served = await asyncio.wait_for(
            asyncio.to_thread(served_digests, config, None), PROBE_TIMEOUT * 60
        )
        check_digests(config.expected_model_digests, served)
    except UpstreamError as exc:
        raise CheckFailed(
            str(exc),
            "serve the expected weights, or correct expected_model_digests / upstream_model_path",
        ) from None
    digests = ", ".join(f"{m.name} {m.digest}" for m in served)
    return f"listed: {', '.join(wanted or listed[:3])}" + (
        f"; weights {digests}" if digests else ""
    )


async def _docker(settings: Settings) -> str | None:
    if settings.upstream_mode != "container":
        return None
    import docker.errors

    from paygate.upstream.engine import connect
    from paygate.upstream.errors import UpstreamError
    from paygate.upstream.spec import container_spec

    config = settings.upstream()
    spec = container_spec(config)

    def look() -> str:
        try:
            client = connect(config.docker_host)
        except UpstreamError as exc:
            raise CheckFailed(str(exc), "start dockerd or correct docker_host") from None
        try:
            for image in (spec.image, spec.relay_image):
                try:
                    client.images.get(image)
                except docker.errors.ImageNotFound:
                    fix = f"docker pull {image} (or docker load it)"
                    raise CheckFailed(f"image {image} is not on the engine", fix) from None
        finally:
            client.close()
        return f"engine reachable; {spec.image} present"

    return await asyncio.wait_for(asyncio.to_thread(look), PROBE_TIMEOUT * 4)


async def _facilitator(settings: Settings) -> str | None:
    if settings.payment_mode not in ("facilitator", "verify-only") or not settings.facilitator_url:
        return None
    url = settings.facilitator_url.rstrip("/")
    headers = settings.facilitator_auth_provider().headers("GET", url + "/supported")
    return await _supported(url, headers, settings.network)


async def facilitator_check(url: str, headers: dict[str, str], networks: list[str]) -> Check:
    """The facilitator at ``url`` answers ``/supported`` with `exact` on every network."""
    try:
        return Check("facilitator", True, await _supported(url, headers, networks))
    except CheckFailed as failed:
        return failed.check("facilitator")


async def _supported(url: str, headers: dict[str, str], networks: list[str]) -> str:
    try:
        status, body = await _get(url + "/supported", headers)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise CheckFailed(
            f"unreachable ({type(exc).__name__})", "check facilitator_url and the network"
        ) from None
    if status in (401, 403):
        raise CheckFailed(f"HTTP {status}", "set facilitator_headers_file")
    kinds = body.get("kinds", []) if isinstance(body, dict) else []
    offered = {(k.get("scheme"), k.get("network")) for k in kinds if isinstance(k, dict)}
    missing = []
    for name in networks:
        network = resolve_network(name)
        if ("exact", network.caip2) not in offered:  # v2 names; our challenges lead with v2
            missing.append(f"{name} ({network.caip2})")
    if missing:
        raise CheckFailed(
            f"/supported lacks scheme exact on {', '.join(missing)}",
            "use a facilitator that settles these networks, or change network",
        )
    return f"/supported lists exact on {', '.join(networks)}"


async def _chain(settings: Settings) -> str | None:
    if not settings.chain_rpc_url:
        return None
    try:
        answer = await _probe("POST", settings.chain_rpc_url, body=_CHAIN_ID, redirects=True)
        chain_id = int(json.loads(answer.body)["result"], 16)
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
        raise CheckFailed(
            f"chain RPC unusable ({type(exc).__name__})", "check chain_rpc_url (and its API key)"
        ) from None
    try:
        wanted = {resolve_network(name).chain_id for name in settings.network}
    except UnknownNetwork as exc:
        raise CheckFailed(str(exc), "correct network") from None
    if chain_id not in wanted:
        raise CheckFailed(
            f"chain RPC is chain id {chain_id}, network wants {sorted(wanted)}",
            "point chain_rpc_url at the configured network's chain",
        )
    return f"chain id {chain_id}"


async def _clock(settings: Settings) -> str | None:
    """The local clock against the ``Date`` header of the chain RPC's (else the facilitator's)
    HTTP answer. A Date header has one-second resolution, far below the limit."""
    if settings.chain_rpc_url:
        source, url, method = "chain RPC", settings.chain_rpc_url, "POST"
        body: Any = _CHAIN_ID
        headers: dict[str, str] = {}
    elif settings.payment_mode in ("facilitator", "verify-only") and settings.facilitator_url:
        source, url, method, body = (
            "facilitator",
            settings.facilitator_url + "/supported",
            "GET",
            None,
        )
        headers = settings.facilitator_auth_provider().headers("GET", url)
    else:
        return None
    try:
        answer = await _probe(method, url, body=body, headers=headers)
        now = answer.at
        remote = parsedate_to_datetime(answer.date).timestamp() if answer.date else None
    except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
        raise CheckFailed(
            f"{source} unreachable ({type(exc).__name__})", f"fix the {source} check first"
        ) from None
    if remote is None:
        raise CheckFailed(
            f"the {source} answer has no Date header",
            "compare the clock by hand: timedatectl status",
        )
    skew = now - remote
    if abs(skew) > CLOCK_SKEW_LIMIT:
        ahead = "ahead of" if skew > 0 else "behind"
        raise CheckFailed(
            f"local clock {abs(skew):.0f} s {ahead} the {source} (limit {CLOCK_SKEW_LIMIT:.0f} s)",
            "synchronise the clock: timedatectl set-ntp true",
        )
    return f"within {CLOCK_SKEW_LIMIT:.0f} s of the {source} ({skew:+.0f} s)"


async def _ledger(settings: Settings) -> str | None:
    if settings.payment_mode == "off":
        return None
    from paygate.x402.ledger_sqlite import SqliteLedger

    try:
        ledger = await SqliteLedger.open(settings.ledger_path)
        await ledger.close()
    except Exception as exc:
        raise CheckFailed(
            f"{settings.ledger_path}: {getattr(exc, 'code', type(exc).__name__)}",
            "make its directory writable by the service user (0700)",
        ) from None
    return f"{settings.ledger_path} writable and migrated"


async def _console(settings: Settings) -> str | None:
    """The operator console's settings (docs/CONSOLE.md); nothing when it is off."""
    if settings.console_listen is None:
        return None
    import ipaddress
    import socket

    from paygate.config import split_listen
    from paygate.console.serve import check_console

    try:
        check_console(settings)
    except ConfigError as exc:
        raise CheckFailed(str(exc), "give console_listen its own port") from None
    host, port = split_listen(settings.console_listen)
    secret = settings.secret("console_secret")
    if secret is None or len(secret.get_secret_value()) < 16:
        raise CheckFailed(
            "console_secret is not set (or shorter than 16 characters): sessions end at "
            "restart and do not work across replicas",
            "set console_secret_file to a file of 32+ random characters (the same on every "
            "replica)",
        )
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not settings.console_tls:
        raise CheckFailed(
            f"console_listen {settings.console_listen} is beyond loopback without TLS",
            "listen on 127.0.0.1 and reach it through ssh -L, or put it behind a TLS proxy "
            "and set console_tls = true",
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise CheckFailed(
                f"cannot listen on {settings.console_listen}: {exc.strerror}",
                "choose a free port for console_listen (or stop what holds it)",
            ) from None
    who = (
        f"{len(settings.console_wallets)} wallet(s) may sign in"
        if settings.console_wallets
        else "no console_wallets: login links only (paygate console login)"
    )
    return f"on {settings.console_listen}; {who}"


async def _alerts(settings: Settings) -> str | None:
    if settings.alert_webhook is None:
        return None
    secret = settings.secret("alert_webhook_secret")
    if secret is None or len(secret.get_secret_value()) < 16:
        raise CheckFailed(
            "alert_webhook is set but alert_webhook_secret is missing or short",
            "set alert_webhook_secret_file to a file of 32+ random characters",
        )
    return "webhook alerts on, signed (HMAC-SHA256)"


# Every check after "config", in the order doctor runs and prints them.
PROBES: dict[str, Probe] = {
    "key-files": _key_files,
    "key": _key,
    "upstream": _upstream,
    "model": _model,
    "docker": _docker,
    "facilitator": _facilitator,
    "chain": _chain,
    "clock": _clock,
    "ledger": _ledger,
    "console": _console,
    "alerts": _alerts,
}
