"""``paygate init``: a guided set-up, interactive or fully by flags (``--yes``).

It asks (or takes from flags) the key backend and creates the key, the model server (given, or
discovered on this host and picked; what answers there is probed and its kind written as
``upstream_kind``; for llama-server and vLLM the model file, so the weights' digest is known),
the wallet that is paid and its networks, the price, the payment mode and facilitator (one is
suggested; its ``/supported`` is asked), a chain RPC URL (its chain id checked); then writes the
TOML file (0644, no secrets in it) and one credential file per secret (0600, in a 0700
directory, named as systemd credentials: docs/DEPLOY.md), and prints the next commands.

Each answer is checked as it is given: a wrong one is said why and asked again, nothing typed
before it is lost. With ``--yes`` a wrong flag is an error; a service that does not answer
(the model server, the facilitator) is only a warning there, as it may not run yet.

Secrets never come from the command line (``ps`` shows it): a passphrase, a PIN or a
facilitator API key comes from its ``PAYGATE_*`` environment variable or a hidden prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import re
import sys
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, TypeVar

from paygate.config import ConfigError, load_settings
from paygate.keys import create_key
from paygate.redact import redact_url
from paygate.x402.networks import UnknownNetwork, resolve_network

T = TypeVar("T")
ENGINE_KINDS = ("ollama", "llama-server", "vllm", "openai")
# The x402 SDK's default facilitator (x402.http.constants.DEFAULT_FACILITATOR_URL): it settles
# on test networks, so it is suggested only when every network is one.
SDK_FACILITATOR = "https://x402.org/facilitator"
TEST_CHAIN_IDS = frozenset({84532, 80002, 43113, 421614})  # base/arbitrum-sepolia, amoy, fuji
PROBE_TIMEOUT = 3.0  # seconds for one look at the model server

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
    p.add_argument(
        "--upstream-kind", choices=ENGINE_KINDS, default=None, help="default: what answers there"
    )
    p.add_argument("--upstream-model-path", default=None, help="the GGUF file llama-server serves")
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

    def valid(
        self,
        given: str | None,
        question: str,
        default: str | None,
        check: Callable[[str | None], T],
    ) -> T:
        """An answer that ``check`` accepts (it returns the value to keep, or raises
        ConfigError saying why): asked again until it does; a wrong flag is an error."""
        while True:
            answer = self.value(given, question, default)
            try:
                return check(answer)
            except ConfigError as exc:
                if given is not None or not self.interactive:
                    raise
                print(f"  {exc}")

    def choice(self, given: str | None, question: str, options: list[str], default: str) -> str:
        def one_of(answer: str | None) -> str:
            if answer not in options:
                raise ConfigError(f"{question}: one of {', '.join(options)}")
            return answer

        return self.valid(given, f"{question} ({'/'.join(options)})", default, one_of)

    def confirm(self, question: str) -> bool:
        """Yes or no (default no); without questions, no."""
        if not self.interactive:
            return False
        return input(f"{question} [y/N]: ").strip().lower() in ("y", "yes")

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

    values["listen"] = ask.valid(
        args.listen, "listen on", "127.0.0.1:8402", lambda v: _setting("listen", v)
    )
    backend = ask.choice(args.key_backend, "key backend", ["software", "pkcs11", "tpm"], "software")
    values["key_backend"] = backend
    if backend == "software":
        values["key_file"] = ask.valid(
            args.key_file, "key file", "/var/lib/paygate/key.pem", _new_key_file
        )
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

    values.update(_upstream(args, ask))

    mode = ask.choice(
        args.payment_mode, "payment mode", ["off", "facilitator", "chain", "verify-only"], "off"
    )
    values["payment_mode"] = mode
    if mode != "off":
        values["pay_to"] = ask.valid(
            args.pay_to, "wallet that is paid (0x...)", None, lambda v: _setting("pay_to", v)
        )
        values["network"] = ask.valid(args.network, "networks (comma-separated)", "base", _networks)
        values["price"] = ask.valid(args.price, "price per request in USD", "0.001", _price)
        if mode in ("facilitator", "verify-only"):
            values["facilitator_url"], secrets_header = _facilitator(args, ask, values["network"])
            if secrets_header:
                secrets["facilitator_headers"] = secrets_header
        rpc = ask.valid(
            args.chain_rpc_url,
            "chain RPC URL (empty: none)",
            None,
            lambda v: _chain_rpc(v, values["network"]),
        )
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
    if not price.is_finite() or price < 0:
        raise ConfigError("price must be a finite number of USD, not negative")
    return str(price)


def _setting(name: str, value: str | None) -> Any:
    """``value`` checked as the setting ``name`` would be; ConfigError says why (never quoting
    it: a setting's value may be a secret)."""
    if not value:
        raise ConfigError(f"{name} is needed")
    return getattr(load_settings(None, **{name: value}), name)


def _new_key_file(text: str | None) -> str:
    path = Path(_setting("key_file", text))
    if path.exists():
        raise ConfigError(f"{path} exists: choose another file (paygate init never replaces a key)")
    if path.is_dir() or (path.parent.exists() and not path.parent.is_dir()):
        raise ConfigError(f"{path} cannot be a key file")
    return str(path)


def _networks(text: str | None) -> list[str]:
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    if not names:
        raise ConfigError("name at least one network, e.g. base-sepolia")
    for name in names:
        try:
            resolve_network(name)
        except UnknownNetwork as exc:
            raise ConfigError(str(exc)) from None
    return names


def _upstream(args: argparse.Namespace, ask: _Asker) -> dict[str, Any]:
    """``upstream_url``, and what answers there: ``upstream_kind``, the model's name and (for
    servers of one GGUF file) ``upstream_model_path``, whose digest attestation then names."""
    from paygate.upstream.discovery import DEFAULT_PORTS, Found, discover, probe_url

    default = "http://127.0.0.1:11434"
    listed: list[Found] = []
    if args.upstream_url is None and (args.discover or ask.interactive):
        listed = asyncio.run(discover(DEFAULT_PORTS))
        for number, server in enumerate(listed, start=1):
            print(f"  {number}. {server.url} ({server.kind}, {len(server.models)} models)")
        if listed:
            default = "1"
        else:
            print("no model server found on this host's usual ports")

    def look(text: str | None) -> tuple[str, Found | None]:
        if text and text.isdigit() and listed:
            if not 1 <= int(text) <= len(listed):
                raise ConfigError(f"pick 1..{len(listed)}, or type a URL")
            text = listed[int(text) - 1].url
        url = _setting("upstream_url", text)
        found = asyncio.run(probe_url(url, timeout=PROBE_TIMEOUT))
        if found is None or found.kind == "http":
            what = "nothing answers" if found is None else "no model server answers"
            message = f"{what} at {redact_url(url)}"
            if args.upstream_url is not None or not ask.interactive:
                print(f"warning: {message}; upstream_kind stays as given", file=sys.stderr)
                return url, None
            if not ask.confirm(f"  {message}: keep it anyway?"):
                raise ConfigError("start the model server, or type its URL (host:port)")
            return url, None
        return url, found

    question = "model server URL" + (" (or a number above)" if listed else "")
    url, found = ask.valid(args.upstream_url, question, default, look)
    values: dict[str, Any] = {"upstream_url": url}
    kind = args.upstream_kind or (found.kind if found is not None else None)
    if found is not None:
        models = ", ".join(found.models[:5]) or "no models listed"
        print(f"  {redact_url(url)} answers like {found.kind} ({models})")
        if args.upstream_kind is not None and args.upstream_kind != found.kind:
            print(f"warning: upstream_kind {args.upstream_kind} as given", file=sys.stderr)
        if len(found.models) == 1:
            values["upstream_model_name"] = found.models[0]
    if kind is not None:
        values["upstream_kind"] = kind
    if kind in ("llama-server", "vllm") or args.upstream_model_path is not None:
        served = found.model_path if found is not None else None
        path = ask.valid(
            args.upstream_model_path,
            "model file it serves (GGUF; empty: no weights digest)",
            served if served and Path(served).is_file() else None,
            _model_file,
        )
        if path is not None:
            values["upstream_model_path"] = path
    return values


def _model_file(text: str | None) -> str | None:
    """A readable GGUF file (its digest is computed now, as the gateway will at start)."""
    if not text:
        return None
    from paygate.upstream.engines.base import file_digest

    path = Path(text).expanduser()
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or type(exc).__name__}") from None
    if magic != b"GGUF":
        raise ConfigError(f"{path} is not a GGUF file")
    print(f"  weights {file_digest(path)}")
    return str(path.resolve())


def _facilitator(
    args: argparse.Namespace, ask: _Asker, networks: list[str]
) -> tuple[str, str | None]:
    """The facilitator URL (one suggested for test networks) and its API key header line,
    checked against its ``GET /supported``: it answers and settles `exact` on every network."""
    testing = all(resolve_network(name).chain_id in TEST_CHAIN_IDS for name in networks)
    if args.facilitator_url is None and ask.interactive:
        if testing:
            print(f"  suggested for test networks: the x402 SDK's default, {SDK_FACILITATOR}")
        else:
            print("  a facilitator that settles your networks (a hosted one takes an API key)")

    def check(text: str | None) -> tuple[str, str | None]:
        url = _setting("facilitator_url", text)
        header = ask.value(args.facilitator_header, "facilitator API key header (empty: none)")
        line = None
        if header:
            if not re.fullmatch(r"[A-Za-z0-9-]+", header):
                raise ConfigError("a header name is letters, digits and dashes")
            key = ask.secret("facilitator_headers", f"value of {header}")
            if not key:
                raise ConfigError(f"{header} needs a value ($PAYGATE_INIT_FACILITATOR_API_KEY)")
            line = f"{header}: {key}"
        problem = asyncio.run(_facilitator_problem(url, line, networks))
        if problem is not None:
            if args.facilitator_url is not None or not ask.interactive:
                print(f"warning: facilitator {problem}", file=sys.stderr)
            elif not ask.confirm(f"  {redact_url(url)}: {problem}; keep it anyway?"):
                raise ConfigError("type another facilitator URL")
        return url, line

    suggested = SDK_FACILITATOR if testing else None
    return ask.valid(args.facilitator_url, "facilitator URL", suggested, check)


async def _facilitator_problem(url: str, header: str | None, networks: list[str]) -> str | None:
    """Why this facilitator will not do (doctor's own check), or None."""
    from paygate.cli.doctor import facilitator_check

    headers = {}
    if header is not None:
        name, _, value = header.partition(": ")
        headers[name] = value
    found = await facilitator_check(url, headers, networks)
    return None if found.ok else found.detail


def _chain_rpc(text: str | None, networks: list[str]) -> str | None:
    """An RPC URL of the configured networks' chain (eth_chainId asked now), or None."""
    if not text:
        return None
    url = _setting("chain_rpc_url", text)
    from paygate.cli.doctor import run_check

    check = asyncio.run(
        run_check("chain", load_settings(None, chain_rpc_url=url, network=networks))
    )
    if check is not None and not check.ok:
        raise ConfigError(f"chain check failed: {check.detail}")
    return url


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
