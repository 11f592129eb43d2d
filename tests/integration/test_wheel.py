"""The built wheel ships the product only (no test or demo tooling, contracts or artefacts), and
is reproducible: its code digest is what a caller pins."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from paygate import release

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


def _build(source: Path, out: Path, epoch: str) -> Path:
    out.mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
        env={**os.environ, "SOURCE_DATE_EPOCH": epoch},
    )
    (wheel,) = out.glob("paygate-*.whl")
    return wheel


def test_two_builds_of_one_commit_are_the_same_wheel_and_name_the_running_code(
    tmp_path: Path,
) -> None:
    """Reproducible: with SOURCE_DATE_EPOCH, two builds from two copies of one tree (other
    paths, other times) are byte for byte the same; the code digest of the wheel is the one
    `paygate release digest` prints for the code running here (the value PCR 23 measures)."""
    epoch = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%ct"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    wheels = []
    for name in ("first", "second"):
        source = tmp_path / name / "src"
        shutil.copytree(
            ROOT,
            source,
            ignore=shutil.ignore_patterns(
                ".venv", ".git", "node_modules", "build", "*.egg-info", "__pycache__"
            ),
        )
        wheels.append(_build(source, tmp_path / name / "dist", epoch))
    first, second = (hashlib.sha256(w.read_bytes()).hexdigest() for w in wheels)
    assert first == second
    printed = subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "release", "digest", "--wheel", str(wheels[0])],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert printed == release.wheel_code_digest(wheels[0]) == release.code_digest()
    # Another epoch is another wheel (the timestamps are in it), with the same code digest.
    other = _build(tmp_path / "first" / "src", tmp_path / "later", str(int(epoch) + 86_400))
    assert hashlib.sha256(other.read_bytes()).hexdigest() != first
    assert release.wheel_code_digest(other) == printed
