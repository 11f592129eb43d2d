"""``paygate serve`` (the gateway) and ``paygate fake-upstream`` (the FAKE model server).

``serve`` builds the app from settings, listens, and on SIGTERM or SIGINT stops accepting,
lets in-flight requests and streams finish for up to ``shutdown_grace_seconds``, then closes
the upstream session and the key backend and exits 0.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from aiohttp import web

from paygate.config import Settings, load_settings
from paygate.server.app import LISTEN_BACKLOG, build_app, server_options
from paygate.server.logs import SafeAccessLogger, install_safe_logging
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
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.name is not None:
        # The deployment's fields over the file and environment; flags over the deployment.
        store = DeploymentStore(load_settings(args.config).deployments_dir)
        overrides.update(settings_overrides(store.get(args.name), set(Settings.model_fields)))
    overrides.update(
        (name, value)
        for name, value in (("listen", args.listen), ("upstream_url", args.upstream_url))
        if value is not None
    )
    settings = load_settings(args.config, **overrides)
    install_safe_logging()
    app = build_app(settings)  # refuses unimplemented payment modes before listening
    log.info(
        "paygate gateway on %s, payment_mode=%s, key_backend=%s",
        settings.listen,
        settings.payment_mode,
        settings.key_backend,
    )
    web.run_app(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        shutdown_timeout=settings.shutdown_grace_seconds,
        backlog=LISTEN_BACKLOG,
        access_log_class=SafeAccessLogger,
        print=None,
        **server_options(settings),
    )
    log.info("paygate gateway stopped")
    return 0
