"""``paygate serve [NAME]``: the gateway (a named deployment's settings, or the file's and the
environment's; the FAKE model server's ``fake-upstream`` command is devtools').

``serve`` builds the app from the settings (refusing what cannot work before listening),
listens, starts the operator console when ``console_listen`` is set, tells systemd READY=1
(``Type=notify``; the watchdog is pinged from the event loop, or with workers from the
supervisor's loop, and STOPPING=1 is sent on the way out), and on SIGTERM or SIGINT stops
accepting, lets in-flight requests and streams finish for up to ``shutdown_grace_seconds``, then
closes the app's resources in reverse (``paygate.server.app``: the gateway, payments, alerts, the
upstreams and their sessions, the key backend) and exits 0. With ``--workers N`` (``workers``) the
parent binds the port (and the console's) and forks N workers that share it, each its own
replica (``paygate.server.workers``); SIGTERM to the parent stops them all the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from paygate import restore_recursion_limit
from paygate.cli.options import FieldFlag, FieldFlags, add_config, whole_number
from paygate.config import ConfigError, Settings, load_settings
from paygate.console.serve import (
    check_console,
    console_socket,
    start_console,
    with_console_secret,
)
from paygate.redact import redact_url
from paygate.server.app import LISTEN_BACKLOG, build_app, server_options, settle_heap
from paygate.server.assembly import check_payment_settings
from paygate.server.eventloop import new_event_loop
from paygate.server.logs import install_logging
from paygate.server.metrics import MULTIPROC_ENV, prepare_multiprocess_dir, worker_exited
from paygate.server.replica_name import hold_default_name
from paygate.server.sdnotify import Notifier, stop_task
from paygate.server.workers import check_workers, listen_socket, supervise
from paygate.store.deployments import DeploymentStore, settings_overrides

log = logging.getLogger("paygate.serve")


# The settings a flag overrides (over a named deployment's, the file's and the environment's).
_FLAGS = FieldFlags(
    FieldFlag("--listen", "listen", "host:port to listen on (PAYGATE_LISTEN)"),
    FieldFlag("--upstream-url", "upstream_url", "model server base URL (PAYGATE_UPSTREAM_URL)"),
    FieldFlag(
        "--workers",
        "workers",
        "worker processes sharing the port (PAYGATE_WORKERS)",
        whole_number(1, 64, "must be a whole number from 1 to 64"),
    ),
)


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="run the gateway in front of the model server")
    serve.add_argument(
        "name", nargs="?", default=None, help="a named deployment (paygate deploy) to serve"
    )
    add_config(serve)
    _FLAGS.add_to(serve)
    serve.set_defaults(run=_serve)


def _serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    if args.name is not None:
        # The deployment's fields over the file and environment; flags over the deployment.
        store = DeploymentStore(load_settings(args.config).deployments_dir)
        overrides.update(settings_overrides(store.get(args.name), set(Settings.model_fields)))
    overrides.update(_FLAGS.given(args))
    settings = load_settings(args.config, **overrides)
    check_console(settings)
    settings = with_console_secret(settings)  # one secret for every worker's console
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
    host = settings.replica_id or socket.gethostname()  # key ids name it (SCALING.md)
    held = hold_default_name(settings.ledger_path.parent) if settings.replica_id is None else None
    if held is not None:  # a restart takes back what this installation's last run held
        settings = settings.model_copy(update={"replica_id": held.name})
    try:
        return _serve_as(settings, host)
    finally:
        if held is not None:
            held.close()


def _serve_as(settings: Settings, host: str) -> int:
    notifier = Notifier.from_environment()
    if settings.workers == 1:
        app = build_app(settings)  # refuses unimplemented payment modes before listening
        restore_recursion_limit()  # in case building the app imported web3 for the first time
        with asyncio.Runner(loop_factory=lambda: new_event_loop(settings.event_loop)) as runner:
            runner.run(_run(app, settings, notifier))
        log.info("paygate gateway stopped")
        return 0
    check_workers(
        settings.workers,
        # Any container-managed upstream of the set: each worker would start its own.
        upstream_mode="container"
        if any(e.config.mode == "container" for e in settings.upstream_entries())
        else "attach",
        key_backend=settings.key_backend,
        tpm_tcti=settings.tpm_tcti,
        key_epoch=settings.key_epoch,
    )
    check_payment_settings(settings)  # before forking: one clear error, not N
    metrics_dir = os.environ.get(MULTIPROC_ENV)
    if metrics_dir:
        prepare_multiprocess_dir(Path(metrics_dir))  # before any worker writes there
    else:
        log.warning("workers > 1 without %s: /metrics shows one worker's counts", MULTIPROC_ENV)
    sock = listen_socket(settings.listen_host, settings.listen_port, LISTEN_BACKLOG)
    console = console_socket(settings)
    _announce(settings)

    def worker(index: int) -> int:
        # Each worker is its own replica: "<replica_id>.w<index>", or its own <hostname>:<pid>.
        mine = settings
        if settings.replica_id is not None:
            mine = settings.model_copy(update={"replica_id": f"{settings.replica_id}.w{index}"})
        # Key epochs are the host's, one set for every worker (paygate.keys.epoch_keys).
        app = build_app(mine, worker=index, epoch_replica=host)  # its share of the rate limits
        restore_recursion_limit()
        if console is not None:
            app.cleanup_ctx.append(_console_starter(mine, console))
        # The loop is made in the worker, after the fork; the supervisor speaks to systemd.
        with asyncio.Runner(loop_factory=lambda: new_event_loop(mine.event_loop)) as runner:
            runner.run(_run(app, mine, Notifier(None), sock=sock))
        return 0

    status = supervise(
        settings.workers,
        worker,
        grace_seconds=settings.shutdown_grace_seconds,
        on_started=lambda: notifier.ready(
            f"serving on {settings.listen}, {settings.workers} workers"
        ),
        on_tick=_watchdog_ticker(notifier),
        on_exit=worker_exited,
        on_stop=notifier.stopping,
    )
    sock.close()
    if console is not None:
        console.close()
    log.info("paygate gateway stopped")
    return status


def _console_starter(settings: Settings, sock: Any) -> Callable[[web.Application], Any]:
    """A worker's console as the last of its app's cleanup contexts: started once the gateway's
    parts are, stopped first."""

    async def console(app: web.Application) -> AsyncIterator[None]:
        runner = await start_console(settings, app, sock=sock)
        yield
        if runner is not None:
            await runner.cleanup()

    return console


async def _run(
    app: web.Application,
    settings: Settings,
    notifier: Notifier,
    *,
    sock: socket.socket | None = None,
) -> None:
    """Start (key, upstream, payments), listen (on ``sock``, a worker's shared socket, or on
    ``listen``), tell systemd, serve until SIGTERM/SIGINT, then stop accepting and give
    in-flight requests ``shutdown_grace_seconds``."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.debug(
        "systemd notify %s, watchdog %s",
        "on" if notifier.enabled else "off (no NOTIFY_SOCKET)",
        f"every {notifier.watchdog_usec / 2e6:g}s" if notifier.watchdog_usec else "off",
    )
    waiting = " (waiting for the model server)" if settings.upstream_mode == "container" else ""
    notifier.status(f"starting{waiting}")
    runner = web.AppRunner(
        app,
        shutdown_timeout=settings.shutdown_grace_seconds,
        access_log=None,  # the request event (paygate.request) replaces aiohttp's line
        handle_signals=False,
        **server_options(settings),
    )
    try:
        await runner.setup()  # cleanup_ctx: key, session, upstream (container: ready), payments
    except BaseException:
        # A part that fails to start (a ConfigError, an unreachable ledger) leaves the parts
        # before it open: close them here, or the loop's shutdown finalizes them noisily
        # ("error during closing of asynchronous generator", "Unclosed client session").
        await runner.cleanup()
        raise
    watchdog = None
    console = None
    try:
        if sock is not None:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        else:
            await web.TCPSite(
                runner, settings.listen_host, settings.listen_port, backlog=LISTEN_BACKLOG
            ).start()
            console = await start_console(settings, app)
            _announce(settings)
        settle_heap()  # what start built lives as long as the process
        # Ready only now: listening, and in container mode the model server answered.
        notifier.ready(f"serving on {settings.listen}, payment_mode={settings.payment_mode}")
        watchdog = notifier.start_watchdog()
        await stop.wait()
        notifier.stopping(f"stopping: draining for up to {settings.shutdown_grace_seconds:g}s")
    finally:
        await stop_task(watchdog)
        if console is not None:
            await console.cleanup()
        await runner.cleanup()


def _watchdog_ticker(notifier: Notifier) -> Callable[[], None]:
    """WATCHDOG=1 from the supervisor's loop, at most every half interval. With workers the
    watchdog watches the supervisor; a worker whose loop is stuck is not detected by it."""
    interval = (notifier.watchdog_usec or 0) / 2_000_000
    last = 0.0

    def tick() -> None:
        nonlocal last
        now = time.monotonic()
        if notifier.watchdog_usec is not None and now - last >= interval:
            notifier.watchdog()
            last = now

    return tick


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
