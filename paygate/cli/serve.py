"""``paygate serve`` (the gateway) and ``paygate fake-upstream`` (the FAKE model server).

``serve`` builds the app from settings, listens, and on SIGTERM or SIGINT stops accepting,
lets in-flight requests and streams finish for up to ``shutdown_grace_seconds``, then closes
the upstream session and the key backend and exits 0. With ``--workers N`` (``workers``) the
parent binds the port and forks N workers that share it (``paygate.server.workers``); SIGTERM
to the parent stops them all the same way.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from paygate import restore_recursion_limit
from paygate.config import ConfigError, Settings, load_settings
from paygate.redact import redact_url
from paygate.server.app import LISTEN_BACKLOG, build_app, server_options
from paygate.server.assembly import check_payment_settings
from paygate.server.eventloop import new_event_loop
from paygate.server.logs import install_logging
from paygate.server.workers import check_workers, listen_socket, supervise
from paygate.store.deployments import DeploymentStore, settings_overrides

log = logging.getLogger("paygate.serve")


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gateway in front of the model server")
    serve.add_argument(
        "name", nargs="?", default=None, help="a named deployment (paygate deploy) to serve"
    )
    # SUPPRESS: `paygate --config F serve` and `paygate serve --config F` both work.
    serve.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML settings")
    serve.add_argument("--listen", help="host:port to listen on (PAYGATE_LISTEN)")
    serve.add_argument("--upstream-url", help="model server base URL (PAYGATE_UPSTREAM_URL)")
    serve.add_argument(
        "--workers", type=_workers, help="worker processes sharing the port (PAYGATE_WORKERS)"
    )
    serve.set_defaults(run=_serve)


def _workers(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError("must be a whole number from 1 to 64")
    return int(text)


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.name is not None:
        # The deployment's fields over the file and environment; flags over the deployment.
        store = DeploymentStore(load_settings(args.config).deployments_dir)
        overrides.update(settings_overrides(store.get(args.name), set(Settings.model_fields)))
    overrides.update(
        (name, value)
        for name, value in (
            ("listen", args.listen),
            ("upstream_url", args.upstream_url),
            ("workers", args.workers),
        )
        if value is not None
    )
    settings = load_settings(args.config, **overrides)
    try:
        secrets = settings.log_secrets()
    except ConfigError:
        secrets = []  # build_app below refuses the unreadable secret with its own message
    install_logging(
        settings.log_level,
        settings.log_format,
        secrets,
        secret_urls=(settings.chain_rpc_url, settings.facilitator_url),
    )
    if settings.workers == 1:
        app = build_app(settings)  # refuses unimplemented payment modes before listening
        restore_recursion_limit()  # in case building the app imported web3 for the first time
        _announce(settings)
        web.run_app(
            app,
            host=settings.listen_host,
            port=settings.listen_port,
            shutdown_timeout=settings.shutdown_grace_seconds,
            backlog=LISTEN_BACKLOG,
            access_log=None,  # the request event (paygate.request) replaces aiohttp's line
            print=None,
            loop=new_event_loop(settings.event_loop),
            **server_options(settings),
        )
        log.info("paygate gateway stopped")
        return 0
    check_workers(
        settings.workers,
        upstream_mode=settings.upstream_mode,
        key_backend=settings.key_backend,
        tpm_tcti=settings.tpm_tcti,
    )
    check_payment_settings(settings)  # before forking: one clear error, not N
    sock = listen_socket(settings.listen_host, settings.listen_port, LISTEN_BACKLOG)
    _announce(settings)

    def worker(index: int) -> int:
        # Each worker is its own replica: "<replica_id>.w<index>", or its own <hostname>:<pid>.
        mine = settings
        if settings.replica_id is not None:
            mine = settings.model_copy(update={"replica_id": f"{settings.replica_id}.w{index}"})
        app = build_app(mine)
        restore_recursion_limit()
        web.run_app(
            app,
            sock=sock,
            shutdown_timeout=mine.shutdown_grace_seconds,
            access_log=None,  # the request event (paygate.request) replaces aiohttp's line
            print=None,
            loop=new_event_loop(mine.event_loop),  # made in the worker, after the fork
            **server_options(mine),
        )
        return 0

    status = supervise(settings.workers, worker, grace_seconds=settings.shutdown_grace_seconds)
    sock.close()
    log.info("paygate gateway stopped")
    return status


def _announce(settings: Settings) -> None:
    log.info(
        "paygate gateway on %s, payment_mode=%s, key_backend=%s, workers=%d, facilitator=%s, "
        "chain_rpc=%s, event_loop=%s",
        settings.listen,
        settings.payment_mode,
        settings.key_backend,
        settings.workers,
        redact_url(settings.facilitator_url) or "-",
        redact_url(settings.chain_rpc_url) or "-",
        settings.event_loop,
    )
