"""Throw-away local instances of the hardware the appliance talks to, for the demo and the tests.

SoftHSM2 (a PKCS#11 token in a temporary directory) and swtpm (a TPM 2.0 simulator on loopback).
Nothing here is used in production serving. A missing program raises :class:`ComponentMissing`
naming the Debian package and the setup script that installs it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from paygate.errors import PaygateError

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
SETUP_HINT = "run `bash scripts/setup.sh`, which installs it"


class ComponentMissing(PaygateError):
    """a component needed here is not installed"""

    code = "component_missing"


def require(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        raise ComponentMissing(f"{program} not found: apt-get install {package}; {SETUP_HINT}")
    return path


@dataclass(frozen=True, slots=True)
class SoftHsmToken:
    """An initialised SoftHSM2 token: everything needed to open it."""

    conf: Path
    module_path: str
    token_label: str
    pin: str = field(repr=False)
    so_pin: str = field(repr=False)

    def env(self) -> dict[str, str]:
        """Environment a process needs to see this token (SoftHSM reads SOFTHSM2_CONF)."""
        return {"SOFTHSM2_CONF": str(self.conf)}


def init_softhsm_token(directory: Path, label: str = "paygate") -> SoftHsmToken:
    """Create a fresh SoftHSM2 token store under ``directory`` and one initialised token."""
    util = require("softhsm2-util", "softhsm2")
    if not SOFTHSM_MODULE.exists():
        raise ComponentMissing(f"{SOFTHSM_MODULE} missing: apt-get install softhsm2; {SETUP_HINT}")
    tokens = directory / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    token = SoftHsmToken(
        conf=conf,
        module_path=str(SOFTHSM_MODULE),
        token_label=label,
        pin=secrets.token_hex(8),
        so_pin=secrets.token_hex(8),
    )
    result = subprocess.run(
        [util, "--init-token", "--free", "--label", label,
         "--so-pin", token.so_pin, "--pin", token.pin],
        env={**os.environ, **token.env()},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise PaygateError(f"softhsm2-util --init-token failed: {result.stderr.strip()[-500:]}")
    return token


def free_port(pairs: int = 1) -> int:
    """A loopback TCP port P such that P .. P+pairs-1 were all free a moment ago."""
    for _ in range(200):
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
        if port + pairs > 65535:
            continue
        try:
            for extra in range(1, pairs):
                with socket.socket() as other:
                    other.bind(("127.0.0.1", port + extra))
        except OSError:
            continue
        return port
    raise PaygateError("no free loopback port range found")


START_TIMEOUT = 10.0  # seconds for swtpm to accept connections
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL


@dataclass
class Swtpm:
    """One swtpm (TPM 2.0 simulator) on 127.0.0.1. ``tcti`` is what tpm2-pytss/tpm2-tools take.

    Stopped by the PID from its own pid file (SIGTERM, then SIGKILL after a bounded wait), never
    by process name, so other swtpm instances are left alone. swtpm has no resource manager:
    transient objects are shared by every connection and survive a client that did not flush.
    """

    binary: str
    state_dir: Path
    port: int = 0
    pid: int = 0
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.state_dir.parent / f"{self.state_dir.name}.log"

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def pid_file(self) -> Path:
        return self.state_dir.parent / f"{self.state_dir.name}.pid"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        last_error = ""
        for _ in range(3):  # another process may grab the port between free_port and bind
            self.port = free_port(pairs=2)
            self.pid_file.unlink(missing_ok=True)
            cmd = [
                self.binary, "socket", "--tpm2",
                "--tpmstate", f"dir={self.state_dir}",
                "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--flags", "not-need-init,startup-clear",
                "--daemon", "--pid", f"file={self.pid_file}",
            ]  # fmt: skip
            # Output to a file, not a pipe: the daemon inherits the descriptors and would keep
            # a pipe open, making the wait for the launcher hang.
            with self.log.open("ab") as log:
                proc = subprocess.run(
                    cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, timeout=30, check=False
                )
            if proc.returncode == 0 and self._wait_ready():
                return
            self.stop()
            last_error = self.log.read_text(errors="replace")[-2000:]
        raise PaygateError(f"swtpm did not start on 127.0.0.1: {last_error or 'no output'}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            pid = self._read_pid()
            if pid:
                self.pid = pid
                # A bare TCP connect is enough: swtpm accepts only once the TPM is initialised.
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
                ):
                    return True
            time.sleep(0.05)
        return False

    def _read_pid(self) -> int:
        try:
            return int(self.pid_file.read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _is_ours(self, pid: int) -> bool:
        # Guard against a recycled PID: it must still be swtpm serving our state directory.
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z"
        return not zombie and f"dir={self.state_dir}".encode() in cmdline

    def stop(self) -> None:
        """Stop this swtpm by its PID (SIGTERM, then SIGKILL). Idempotent."""
        pid = self._read_pid() or self.pid
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not (pid and self._is_ours(pid)):
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while self._is_ours(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pid = 0
        self.pid_file.unlink(missing_ok=True)

    def restart(self) -> None:
        """Stop and start on the same state (an appliance reboot); the port may change."""
        self.stop()
        self.start()


def start_swtpm(state_dir: Path) -> Swtpm:
    """Start a swtpm with its state in ``state_dir`` and wait until it accepts connections."""
    tpm = Swtpm(binary=require("swtpm", "swtpm"), state_dir=state_dir)
    tpm.start()
    return tpm


EK_STATE_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "make_swtpm_ek_state.sh"


@dataclass(frozen=True, slots=True)
class EkState:
    """A swtpm state whose EK certificates a local CA issued (docs/ATTESTATION.md)."""

    directory: Path
    state: Path  # serve a copy: swtpm rewrites its state file
    chain_pem: Path  # the issuing intermediate and the root: what a verifier trusts


def make_ek_state(directory: Path) -> EkState:
    """Run scripts/make_swtpm_ek_state.sh: a fresh local EK CA and a TPM state under it."""
    require("swtpm_setup", "swtpm-tools")
    require("tpm2_createek", "tpm2-tools")
    if not EK_STATE_SCRIPT.is_file():
        raise ComponentMissing(f"{EK_STATE_SCRIPT} not found: run from a paygate checkout")
    result = subprocess.run(
        ["bash", str(EK_STATE_SCRIPT), str(directory)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise PaygateError(f"{EK_STATE_SCRIPT.name} failed: {result.stderr.strip()[-1000:]}")
    return EkState(directory, directory / "state", directory / "ek-ca-chain.pem")


def start_swtpm_from(ek: EkState, state_dir: Path) -> Swtpm:
    """Start a swtpm on a copy of ``ek``'s state in ``state_dir``."""
    shutil.copytree(ek.state, state_dir, ignore=shutil.ignore_patterns(".lock"))
    return start_swtpm(state_dir)
