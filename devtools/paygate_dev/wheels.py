"""Wheels of paygate and its runtime dependencies, for images built without a network.

The private dockerd's build containers cannot reach a package index, so the host's pip (with
whatever index it is configured for) builds the wheels and the image installs them with
``--no-index``. The dependencies' wheels are cached under the cache directory, keyed by the
dependency list; paygate's own wheel is built fresh from the checkout each time (seconds).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from paygate.errors import PaygateError
from paygate_dev.docker_stack import _locked, cache_dir

PROJECT = Path(__file__).resolve().parents[2]
WHEEL_TIMEOUT = 900  # seconds: a cold cache downloads (and may build) every dependency


def runtime_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """The project's runtime dependencies (and those of ``extras``) from pyproject.toml."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return found


def wheelhouse(extras: tuple[str, ...] = ()) -> Path:
    """A fresh directory with paygate's wheel and every runtime dependency's wheel."""
    requirements = runtime_requirements(extras)
    key = hashlib.sha256(
        f"{sys.version_info[:2]}|{'|'.join(sorted(requirements))}".encode()
    ).hexdigest()[:16]
    deps = cache_dir().parent / "wheels" / f"deps-{key}"
    if not deps.exists():
        deps.parent.mkdir(parents=True, exist_ok=True)
        with _locked(deps.parent / ".build.lock"):
            if not deps.exists():
                partial = Path(tempfile.mkdtemp(prefix="deps-", dir=deps.parent))
                _pip("wheel", "--wheel-dir", str(partial), *requirements)
                partial.rename(deps)
    out = Path(tempfile.mkdtemp(prefix="wheels-"))
    for wheel in deps.glob("*.whl"):
        shutil.copy2(wheel, out / wheel.name)
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    with tempfile.TemporaryDirectory(prefix="paygate-src-") as source:
        shutil.copytree(
            PROJECT,
            Path(source) / "src",
            ignore=shutil.ignore_patterns(
                ".venv", ".git", "node_modules", "build", "*.egg-info", "tests", "bench"
            ),
        )
        _pip("wheel", "--no-deps", "--wheel-dir", str(out), str(Path(source) / "src"))
    return out


def _pip(*args: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=WHEEL_TIMEOUT,
        check=False,
    )
    if result.returncode != 0:
        raise PaygateError(f"pip {args[0]} failed: {(result.stderr or result.stdout)[-1500:]}")
