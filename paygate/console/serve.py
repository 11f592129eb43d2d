"""Starting the console beside the gateway: its own runner and listener (``console_listen``),
never the gateway's port. With workers, the parent binds the console's socket once and every
worker serves it (:func:`console_socket`), as with the gateway's."""

from __future__ import annotations

import logging
import secrets
import socket

from aiohttp import web
from pydantic import SecretStr

from paygate.config import ConfigError, Settings, split_listen

log = logging.getLogger("paygate.console")


def check_console(settings: Settings) -> None:
    """Refuse, before anything listens, a console that cannot be safe."""
    if settings.console_listen is None:
        return
    host, port = split_listen(settings.console_listen)
    gateway_host, gateway_port = settings.listen_host, settings.listen_port
    if (
        port == gateway_port
        and port != 0
        and (host == gateway_host or "0.0.0.0" in (host, gateway_host))  # noqa: S104
    ):
        raise ConfigError(
            "console_listen must not be the gateway's listen address (its public port)"
        )
    if not settings.console_wallets:
        log.info("console_wallets is empty: sign in with `paygate console login` links only")


def with_console_secret(settings: Settings) -> Settings:
    """Settings whose console secret is set: the configured one, else one made now (for the
    workers forked from here to share; sessions then end at restart)."""
    if settings.console_listen is None or settings.secret("console_secret") is not None:
        return settings
    log.warning("console_secret is not set: console sessions end when paygate restarts")
    return settings.model_copy(update={"console_secret": SecretStr(secrets.token_urlsafe(32))})


def console_socket(settings: Settings, backlog: int = 128) -> socket.socket | None:
    if settings.console_listen is None:
        return None
    from paygate.server.workers import listen_socket

    host, port = split_listen(settings.console_listen)
    return listen_socket(host, port, backlog)


async def start_console(
    settings: Settings, gateway: web.Application, *, sock: socket.socket | None = None
) -> web.AppRunner | None:
    """Set up and start the console for a gateway whose app has started; None when off."""
    if settings.console_listen is None:
        return None
    from paygate.console.app import build_console

    runner = web.AppRunner(build_console(settings, gateway), access_log=None, shutdown_timeout=2)
    await runner.setup()
    if sock is not None:
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        host, port = split_listen(settings.console_listen)
        site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("operator console on %s", settings.console_listen)
    return runner
