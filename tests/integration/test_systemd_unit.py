"""The shipped systemd unit verifies cleanly and stays hardened (systemd-analyze, offline)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.components import require_binary

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "paygate.service"
INSTALLED_BINARY = "/opt/paygate/venv/bin/paygate"
EXPOSURE_THRESHOLD = 2.0  # systemd's scale: 0 (locked down) .. 10 (unprotected); "OK" is < 3.5


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    # systemd-analyze verify fails on a missing ExecStart binary: point it at this checkout's.
    binary = Path(sys.executable).parent / "paygate"
    assert binary.exists(), "paygate console script missing from the venv"
    text = UNIT.read_text()
    assert INSTALLED_BINARY in text
    path = tmp_path / "paygate.service"
    path.write_text(text.replace(INSTALLED_BINARY, str(binary)))
    return path


def test_unit_verifies_without_any_warning(unit: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    # Unknown keys only warn on stderr: any stderr at all is a failure.
    assert (result.returncode, result.stderr) == (0, "")


def test_unit_exposure_stays_below_threshold(unit: Path) -> None:
    analyze = require_binary("systemd-analyze", "systemd")
    result = subprocess.run(
        [
            analyze,
            "security",
            "--offline=yes",
            f"--threshold={EXPOSURE_THRESHOLD * 10:.0f}",
            "--json=short",
            str(unit),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    checks = {item["name"]: item for item in json.loads(result.stdout)}
    for setting in (
        "NoNewPrivileges=",
        "ProtectSystem=",
        "PrivateTmp=",
        "RestrictNamespaces=~user",
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
    ):
        assert checks[setting]["set"] is True, setting


def test_unit_is_notify_with_a_watchdog_and_no_secrets_in_its_environment() -> None:
    lines = [line.strip() for line in UNIT.read_text().splitlines()]
    for setting in (
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "RuntimeDirectory=paygate",
    ):
        assert setting in lines, setting
    environment = " ".join(line for line in lines if line.startswith("Environment="))
    for secret in ("PASSPHRASE", "PIN", "GAS_KEY", "API_KEY", "HEADERS"):
        assert secret not in environment
    # Every credential the drop-in offers is one paygate reads by that fixed name.
    from paygate.config import CREDENTIALS

    drop_in = (UNIT.parent / "credentials.conf").read_text()
    offered = [
        line.split("=", 1)[1].split(":", 1)[0]
        for line in drop_in.splitlines()
        if line.startswith("LoadCredential=")
    ]
    assert sorted(offered) == sorted(CREDENTIALS)
