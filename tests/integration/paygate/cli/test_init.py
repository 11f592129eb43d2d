"""``paygate init`` for real: fully by flags and interactively (answers on stdin), against the
FAKE model server, the SDK facilitator and anvil. The files it writes have the right modes,
hold no secret in the TOML, and ``paygate doctor`` passes on them (credentials read from
$CREDENTIALS_DIRECTORY as systemd would hand them over)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from paygate.config import load_settings
from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import ThreadedStack

PAYGATE = str(Path(sys.executable).with_name("paygate"))
PASSPHRASE = "init passphrase 7c2e"
API_KEY = "fk_init_91d3e0aa"


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}
    base.pop("CREDENTIALS_DIRECTORY", None)
    return {**base, **extra}


def _run(args: list[str], env: dict[str, str], stdin: str | None = None):
    return subprocess.run(
        [PAYGATE, *args], env=env, input=stdin, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def fake():
    with ThreadedStack() as stack:
        yield stack


def test_fully_by_flags_then_doctor_passes(tmp_path, fake, facilitator, anvil, seller) -> None:
    config, creds = tmp_path / "etc" / "paygate.toml", tmp_path / "etc" / "credentials"
    key = tmp_path / "state" / "key.pem"
    result = _run(
        ["init", "--yes", "--config", str(config), "--credentials-dir", str(creds),
         "--key-backend", "software", "--key-file", str(key),
         "--payment-mode", "facilitator", "--pay-to", seller, "--network", "base-sepolia",
         "--price", "0.002", "--upstream-url", fake.fake_url,
         "--facilitator-url", facilitator.url, "--facilitator-header", "X-Api-Key",
         "--chain-rpc-url", anvil.rpc_url],
        _env(PAYGATE_KEY_PASSPHRASE=PASSPHRASE, PAYGATE_INIT_FACILITATOR_API_KEY=API_KEY),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"paygate --config {config} doctor" in result.stdout
    text = config.read_text()
    assert PASSPHRASE not in text
    assert API_KEY not in text
    assert _mode(config) == 0o644
    assert _mode(creds) == 0o700
    assert sorted(p.name for p in creds.iterdir()) == ["facilitator_headers", "key_passphrase"]
    assert all(_mode(p) == 0o600 for p in creds.iterdir())
    assert (creds / "facilitator_headers").read_text() == f"X-Api-Key: {API_KEY}\n"
    settings = load_settings(config)
    assert settings.price == settings.price.__class__("0.002")
    assert settings.network == ["base-sepolia"]
    assert _mode(key) == 0o600
    doctor = _run(
        ["--config", str(config), "doctor", "--json"],
        # a ledger of its own: the default path is shared by everything on this host
        _env(CREDENTIALS_DIRECTORY=str(creds), PAYGATE_LEDGER_PATH=str(tmp_path / "payments.db")),
    )
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 0, checks
    assert checks["key"]["ok"] is True  # the passphrase came from the credential


def test_interactive_answers(tmp_path, fake) -> None:
    config = tmp_path / "paygate.toml"
    key = tmp_path / "key.pem"
    answers = "\n".join(["127.0.0.1:9402", "software", str(key), "off"]) + "\n"
    result = _run(
        ["init", "--config", str(config), "--credentials-dir", str(tmp_path / "creds"),
         "--no-passphrase", "--upstream-url", fake.fake_url],
        _env(PAYGATE_INIT_INTERACTIVE="1"),
        stdin=answers,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "key backend (software/pkcs11/tpm) [software]:" in result.stdout
    settings = load_settings(config)
    assert (settings.listen, settings.payment_mode, settings.key_file) == (
        "127.0.0.1:9402",
        "off",
        key,
    )
    assert not (tmp_path / "creds").exists()  # no secrets, no credential directory


def test_wrong_chain_writes_nothing(tmp_path, anvil, seller, facilitator) -> None:
    config = tmp_path / "paygate.toml"
    result = _run(
        ["init", "--yes", "--config", str(config), "--credentials-dir", str(tmp_path / "c"),
         "--key-file", str(tmp_path / "key.pem"), "--no-passphrase",
         "--payment-mode", "facilitator", "--pay-to", seller, "--network", "base",
         "--facilitator-url", facilitator.url, "--chain-rpc-url", anvil.rpc_url,
         "--upstream-url", f"http://127.0.0.1:{free_port()}"],
        _env(),
    )  # fmt: skip
    assert result.returncode != 0
    assert "chain RPC is chain id 84532, network wants [8453]" in result.stderr
    assert not config.exists()
    assert not (tmp_path / "key.pem").exists()


def test_existing_config_needs_force(tmp_path) -> None:
    config = tmp_path / "paygate.toml"
    config.write_text('listen = "127.0.0.1:8402"\n')
    result = _run(["init", "--yes", "--config", str(config)], _env())
    assert result.returncode != 0
    assert "exists: pass --force" in result.stderr
