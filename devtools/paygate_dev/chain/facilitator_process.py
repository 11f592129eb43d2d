"""The dev facilitator as a separate process: killable for real "facilitator down" scenarios.

Faults are switched through the process's loopback control endpoints. The key reaches the child
in a 0600 file, never on the command line or in the environment.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from paygate.errors import PaygateError
from paygate_dev.chain.anvil import NETWORK
from paygate_dev.chain.faults import Fault
from paygate_dev.stack import free_port

START_TIMEOUT = 20.0  # seconds: the child imports web3 and the SDK before it listens
STOP_TIMEOUT = 5.0
CONTROL_TIMEOUT = 5.0


@dataclass
class FacilitatorProcess:
    """``python -m paygate_dev.chain.facilitator`` on 127.0.0.1, owned (and stopped) by PID."""

    rpc_url: str
    private_key: str = field(repr=False)
    work_dir: Path
    network: str = NETWORK
    confirmation_timeout: float = 15.0
    port: int = 0
    address: str = ""  # the settlement signer, known once started
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    @property
    def log_path(self) -> Path:
        return self.work_dir / "facilitator.log"

    def start(self) -> Self:
        """Start (or restart, on the same port once one was chosen) and wait until it listens."""
        if self._proc is not None:
            return self
        self.work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_file = self.work_dir / "facilitator.key"
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(self.private_key)
        self.port = self.port or free_port()
        cmd = [
            sys.executable, "-m", "paygate_dev.chain.facilitator",
            "--rpc-url", self.rpc_url, "--port", str(self.port), "--key-file", str(key_file),
            "--network", self.network, "--confirmation-timeout", str(self.confirmation_timeout),
        ]  # fmt: skip
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            ready = self._ready_line(offset)
            if ready:
                self.address = ready.split()[2]
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.05)
        tail = self.log_path.read_text(errors="replace")[offset:][-1500:]
        self.stop()
        raise PaygateError(f"dev facilitator did not start: {tail or 'no output'}")

    def _ready_line(self, offset: int) -> str:
        with self.log_path.open("rb") as log:
            log.seek(offset)
            for line in log.read().decode(errors="replace").splitlines():
                if line.startswith("READY ") and len(line.split()) == 3:
                    return line
        return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a bounded wait. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """Die at once, mid-request if need be (SIGKILL): a facilitator crash."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(
            method, f"{self.url}/_control/{path}", json=body, timeout=CONTROL_TIMEOUT
        )
        if response.status_code != 200:
            raise PaygateError(f"facilitator control {path}: {response.text[:300]}")
        return response.json()

    def set_fault(
        self,
        fault: Fault | str,
        endpoints: list[str] | str | None = None,
        *,
        delay: float | None = None,
    ) -> None:
        """Switch a fault on in the child. ``down`` stops it; :meth:`start` restarts it."""
        if Fault(fault) is Fault.DOWN:
            self.stop()
            return
        body: dict[str, Any] = {"fault": str(Fault(fault)), "endpoints": endpoints}
        if delay is not None:
            body["delay"] = delay
        self._control("POST", "faults", body)

    def reset(self) -> None:
        self.start()
        self._control("POST", "reset")

    def release_held(self) -> None:
        self._control("POST", "release")

    def state(self) -> dict[str, Any]:
        """``{"faults": {...}, "stats": {"calls": {verify, settle, supported}, "held", ...}}``."""
        return self._control("GET", "state")

    def calls(self, endpoint: str) -> int:
        return int(self.state()["stats"]["calls"][endpoint])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(Exception):
            self.stop()
