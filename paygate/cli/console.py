"""``paygate console login``: a one-time login link for the operator console.

The link's token is random; the ledger keeps only its SHA-256 with an expiry, so any replica's
console accepts it once. Print it on the appliance; anyone holding it can sign in once.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from paygate.cli.options import add_action, command_actions
from paygate.config import ConfigError, load_settings
from paygate.console import auth
from paygate.economics.open_store import economics_store
from paygate.x402.ledger_store import open_ledger


def register(sub: Any) -> None:
    actions = command_actions(sub, "console", "the operator console (docs/CONSOLE.md)")
    add_action(actions, "login", _login, "print a one-time login link (valid 10 minutes)")


async def _issue(settings: Any, token: str) -> None:
    ledger = await open_ledger(settings.ledger_location(), replica="paygate-console-login")
    try:
        await economics_store(ledger).put_login(
            auth.token_hash("link", token), time.time() + auth.LINK_SECONDS
        )
    finally:
        await ledger.close()


def _login(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if settings.console_url is None and settings.console_listen is None:
        raise ConfigError("the console is off: set console_listen (PAYGATE_CONSOLE_LISTEN)")
    token = auth.new_link_token()
    asyncio.run(_issue(settings, token))
    base = settings.console_url or f"http://{settings.console_listen}"
    print(f"{base.rstrip('/')}/login/{token}")
    print(f"valid once, for {int(auth.LINK_SECONDS // 60)} minutes", flush=True)
    return 0
