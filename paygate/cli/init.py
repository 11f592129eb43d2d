"""``paygate init``: a guided set-up, interactive or fully by flags (``--yes``).

It asks (or takes from flags) the key backend and creates the key, the wallet that is paid and
its networks (checked; with a chain RPC URL, its chain id too), the price, the model server
(given, or discovered on this host and picked), the payment mode and facilitator; then writes
the TOML file (0644, no secrets in it) and one credential file per secret (0600, in a 0700
directory, named as systemd credentials: docs/DEPLOY.md), and prints the next commands.

Secrets never come from the command line (``ps`` shows it): a passphrase, a PIN or a
facilitator API key comes from its ``PAYGATE_*`` environment variable or a hidden prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from paygate.config import ConfigError, load_settings
from paygate.keys import create_key
from paygate.x402.networks import UnknownNetwork, resolve_network

SECRET_ENV = {
    "key_passphrase": "PAYGATE_KEY_PASSPHRASE",
    "pkcs11_pin": "PAYGATE_PKCS11_PIN",
    "facilitator_headers": "PAYGATE_INIT_FACILITATOR_API_KEY",
    "gas_key": "PAYGATE_GAS_KEY",
}


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="guided set-up: key, wallet, price, upstream, facilitator")
    p.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="TOML file to write")
    p.add_argument("--credentials-dir", type=Path, default=Path("/etc/paygate/credentials"))
    p.add_argument("--yes", action="store_true", help="no questions: flags and defaults only")
    p.add_argument("--force", action="store_true", help="overwrite an existing config file")
    p.add_argument("--listen", default=None)
    p.add_argument("--key-backend", choices=["software", "pkcs11", "tpm"], default=None)
    p.add_argument("--key-file", default=None)
    p.add_argument("--no-passphrase", action="store_true", help="software key unencrypted")
    p.add_argument("--pkcs11-module", default=None)
    p.add_argument("--tpm-tcti", default=None)
    p.add_argument("--tpm-key-dir", default=None)
    p.add_argument("--payment-mode", choices=["off", "facilitator", "chain", "verify-only"])
    p.add_argument("--pay-to", default=None, help="the wallet that is paid (0x...)")
    p.add_argument("--network", default=None, help="comma-separated, e.g. base,base-sepolia")
    p.add_argument("--price", default=None, help="USD per request, e.g. 0.001")
    p.add_argument("--upstream-url", default=None)
    p.add_argument("--discover", action="store_true", help="find a model server on this host")
    p.add_argument("--facilitator-url", default=None)
    p.add_argument(
        "--facilitator-header",
        default=None,
        help="header name for the facilitator's API key (value: $PAYGATE_INIT_FACILITATOR_API_KEY"
        " or a hidden prompt)",
    )
    p.add_argument("--chain-rpc-url", default=None)
    p.set_defaults(run=_init)


class _Asker:
    """Values from flags, else a question (interactive), else the default."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive

    def value(self, given: str | None, question: str, default: str | None = None) -> str | None:
        if given is not None or not self.interactive:
            return given if given is not None else default
        suffix = f" [{default}]" if default else ""
        answer = input(f"{question}{suffix}: ").strip()
        return answer or default

    def choice(self, given: str | None, question: str, options: list[str], default: str) -> str:
        while True:
            answer = self.value(given, f"{question} ({'/'.join(options)})", default) or default
            if answer in options:
                return answer
            if not self.interactive:
                raise ConfigError(f"{question}: one of {', '.join(options)}")
            print(f"  one of {', '.join(options)}")

    def secret(self, name: str, question: str) -> str | None:
        env = os.environ.get(SECRET_ENV[name])
        if env:
            return env
        if not self.interactive:
            return None
        return getpass.getpass(f"{question}: ") or None


def _init(args: argparse.Namespace) -> int:
    config: Path = getattr(args, "config", None) or Path("/etc/paygate/paygate.toml")
    if config.exists() and not args.force:
        raise ConfigError(f"{config} exists: pass --force to replace it")
    ask = _Asker(interactive=not args.yes and (sys.stdin.isatty() or _forced_interactive()))
    values: dict[str, Any] = {}
    secrets: dict[str, str] = {}

    values["listen"] = ask.value(args.listen, "listen on", "127.0.0.1:8402")
    backend = ask.choice(args.key_backend, "key backend", ["software", "pkcs11", "tpm"], "software")
    values["key_backend"] = backend
    if backend == "software":
        values["key_file"] = ask.value(args.key_file, "key file", "/var/lib/paygate/key.pem")
        if not args.no_passphrase:
            passphrase = ask.secret("key_passphrase", "key passphrase (empty: none)")
            if passphrase:
                secrets["key_passphrase"] = passphrase
    elif backend == "pkcs11":
        values["pkcs11_module"] = ask.value(
            args.pkcs11_module, "PKCS#11 module", "/usr/lib/softhsm/libsofthsm2.so"
        )
        pin = ask.secret("pkcs11_pin", "token user PIN")
        if not pin:
            raise ConfigError("the PKCS#11 backend needs a PIN ($PAYGATE_PKCS11_PIN)")
        secrets["pkcs11_pin"] = pin
    else:
        values["tpm_tcti"] = ask.value(args.tpm_tcti, "TPM TCTI", "device:/dev/tpmrm0")
        values["tpm_key_dir"] = ask.value(
            args.tpm_key_dir, "TPM key dir", "/var/lib/paygate/tpm-key"
        )

    values["upstream_url"] = _upstream(args, ask)

    mode = ask.choice(
        args.payment_mode, "payment mode", ["off", "facilitator", "chain", "verify-only"], "off"
    )
    values["payment_mode"] = mode
    if mode != "off":
        values["pay_to"] = ask.value(args.pay_to, "wallet that is paid (0x...)")
        networks = ask.value(args.network, "networks (comma-separated)", "base") or "base"
        values["network"] = [n.strip() for n in networks.split(",") if n.strip()]
        for name in values["network"]:
            try:
                resolve_network(name)
            except UnknownNetwork as exc:
                raise ConfigError(str(exc)) from None
        values["price"] = _price(ask.value(args.price, "price per request in USD", "0.001"))
        if mode in ("facilitator", "verify-only"):
            values["facilitator_url"] = ask.value(args.facilitator_url, "facilitator URL")
            header = ask.value(args.facilitator_header, "facilitator API key header (empty: none)")
            if header:
                key = ask.secret("facilitator_headers", f"value of {header}")
                if not key:
                    raise ConfigError(f"{header} needs a value ($PAYGATE_INIT_FACILITATOR_API_KEY)")
                secrets["facilitator_headers"] = f"{header}: {key}"
        rpc = ask.value(args.chain_rpc_url, "chain RPC URL (empty: none)")
        if rpc:
            values["chain_rpc_url"] = rpc
        if mode == "chain":
            gas = ask.secret("gas_key", "private key that pays gas (0x...)")
            if not gas:
                raise ConfigError("chain mode needs the gas key ($PAYGATE_GAS_KEY)")
            secrets["gas_key"] = gas
    values = {k: v for k, v in values.items() if v is not None}

    # Validate everything (and the chain) before writing anything.
    settings = load_settings(None, **values)
    if mode != "off":
        from paygate.server.assembly import payment_terms

        payment_terms(settings)  # pay_to, networks and their assets
        if mode in ("facilitator", "verify-only") and not settings.facilitator_url:
            raise ConfigError(f"payment mode {mode} needs a facilitator URL")
    if settings.chain_rpc_url:
        from paygate.cli.doctor import _chain

        check = asyncio.run(_chain(settings))
        if check is not None and not check.ok:
            raise ConfigError(f"chain check failed: {check.detail}")

    written = _write(config, args.credentials_dir, values, secrets)
    key_settings = load_settings(
        None,
        **values,
        **{f"{name}_file": path for name, path in written.items() if name != "facilitator_headers"},
    )
    try:
        key = create_key(key_settings)
    except Exception as exc:
        code = getattr(exc, "code", type(exc).__name__)
        raise ConfigError(f"config written, but the key could not be created ({code})") from None
    fingerprint = key.info().public_key.hex()[:16]
    key.close()
    print(f"wrote {config}")
    for name, path in written.items():
        print(f"wrote {path} (credential {name}, mode 0600)")
    print(f"created the {backend} key (public key {fingerprint}...)")
    print("next:")
    print(f"  paygate --config {config} doctor")
    if written:
        print(f"  install systemd/credentials.conf, keeping the lines for: {', '.join(written)}")
    print("  systemctl enable --now paygate      # or: paygate --config FILE serve")
    return 0


def _forced_interactive() -> bool:
    # Tests and scripts can answer on a pipe.
    return os.environ.get("PAYGATE_INIT_INTERACTIVE") == "1"


def _price(text: str | None) -> str:
    try:
        price = Decimal(text or "")
    except InvalidOperation:
        raise ConfigError("price must be a decimal number of USD, e.g. 0.001") from None
    if price < 0:
        raise ConfigError("price must not be negative")
    return str(price)


def _upstream(args: argparse.Namespace, ask: _Asker) -> str | None:
    if args.upstream_url or not (args.discover or ask.interactive):
        return args.upstream_url
    from paygate.upstream.discovery import DEFAULT_PORTS, discover

    found = asyncio.run(discover(DEFAULT_PORTS))
    if not found:
        print("no model server found on this host")
        return ask.value(None, "model server URL", "http://127.0.0.1:11434")
    for number, server in enumerate(found, start=1):
        print(f"  {number}. {server.url} ({server.kind}, {len(server.models)} models)")
    pick = ask.value(None, "use which", "1") or "1"
    if not pick.isdigit() or not 1 <= int(pick) <= len(found):
        raise ConfigError(f"pick 1..{len(found)}")
    return found[int(pick) - 1].url


def _write(
    config: Path, credentials: Path, values: dict[str, Any], secrets: dict[str, str]
) -> dict[str, Path]:
    config.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# paygate settings (paygate init); secrets are credential files, not here"]
    lines += [f"{name} = {json.dumps(value)}" for name, value in values.items()]
    partial = config.with_name(config.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.chmod(0o644)
    os.replace(partial, config)
    written: dict[str, Path] = {}
    if secrets:
        credentials.mkdir(mode=0o700, parents=True, exist_ok=True)
        credentials.chmod(0o700)
    for name, value in secrets.items():
        path = credentials / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(value + "\n")
        path.chmod(0o600)
        written[name] = path
    return written
