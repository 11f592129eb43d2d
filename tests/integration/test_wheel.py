"""The built wheel ships the product only: no test or demo tooling, contracts or artefacts."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_wheel_holds_paygate_and_enclave_only(tmp_path: Path) -> None:
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".venv", ".git", "node_modules", "build", "*.egg-info"),
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("paygate-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    packages = {name.split("/")[0] for name in names if not name.endswith("/")}
    assert {p for p in packages if not p.endswith(".dist-info")} == {"paygate", "enclave"}
    offenders = [
        name
        for name in names
        if any(part in name for part in ("fake_model", "devchain", "devstack", "paygate_dev"))
        or name.endswith((".sol", "build.json"))
        or "/tests/" in name
    ]
    assert offenders == []
    # Every module the wheel ships is importable without the dev tooling.
    assert any(name == "paygate/cli/main.py" for name in names)
    # The pinned vendor roots ship as package data (the TEE verifiers refuse to run without).
    assert sum(name.startswith("enclave/attestation/roots/") for name in names) == 6
