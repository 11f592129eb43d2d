"""llama.cpp's native llama-server with real weights, for the tests and the demo.

``scripts/setup_llama.sh`` builds the server and fetches the models once, into a cache outside
the clone; :func:`llama_build` asks it (``--check``, which builds nothing) where they are and
raises :class:`ComponentMissing` with what to run when they are not there. :class:`LlamaServer`
runs one server on 127.0.0.1 with one compute thread (more threads spin against the HTTP
thread on small machines) and is stopped by its own PID.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from paygate.errors import PaygateError
from paygate_dev.stack import ComponentMissing, free_port

SETUP_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "setup_llama.sh"
CHECK_TIMEOUT = 30.0
START_TIMEOUT = 60.0  # seconds until /health is 200 (about 0.2 s for the tiny model, 1 s SmolLM2)
STOP_TIMEOUT = 10.0
TINY_REPLY = " hello from the tiny paygate test model."  # what the tiny model always says


class LlamaStartFailed(PaygateError):
    code = "llama_server_failed"


@dataclass(frozen=True)
class LlamaBuild:
    """The cached outputs of scripts/setup_llama.sh."""

    server: Path  # the llama-server executable
    smollm2: Path  # SmolLM2-135M-Instruct, Q4_1 GGUF (real weights)
    tiny: Path  # the tiny generated model (always says TINY_REPLY)


def llama_build(script: Path = SETUP_SCRIPT) -> LlamaBuild:
    """Where setup_llama.sh put the server and models; ComponentMissing if it has not run."""
    hint = f"run `bash scripts/setup.sh` (or `bash {script.name}`): it builds llama-server"
    if not script.is_file():
        raise ComponentMissing(f"{script} is missing: this needs a paygate source checkout")
    try:
        result = subprocess.run(
            ["bash", str(script), "--check"],
            capture_output=True,
            text=True,
            timeout=CHECK_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        failed = f"{script.name} --check failed ({type(exc).__name__})"
        raise ComponentMissing(f"{failed}; {hint}") from None
    if result.returncode != 0:
        raise ComponentMissing(f"{result.stderr.strip()[-500:]}; {hint}")
    paths = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    try:
        build = LlamaBuild(
            server=Path(paths["PAYGATE_LLAMA_SERVER"]),
            smollm2=Path(paths["PAYGATE_LLAMA_SMOLLM2"]),
            tiny=Path(paths["PAYGATE_LLAMA_TINY"]),
        )
    except KeyError as exc:
        raise ComponentMissing(f"{script.name} --check did not name {exc}; {hint}") from None
    return build


@dataclass
class LlamaServer:
    """One llama-server on 127.0.0.1; ``url`` once started."""

    binary: Path
    model: Path
    alias: str
    log: Path
    slots: int = 2
    context: int = 4096
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        return [
            str(self.binary), "-m", str(self.model), "--host", "127.0.0.1",
            "--port", str(self.port), "-t", "1", "--alias", self.alias,
            "-np", str(self.slots), "-c", str(self.context),
        ]  # fmt: skip

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = self.log.read_text(errors="replace")[-1500:]
                code = self.process.returncode
                raise LlamaStartFailed(f"llama-server exited with {code}: {tail}")
            if self._healthy():
                return
            time.sleep(0.05)
        self.stop()
        raise LlamaStartFailed(f"llama-server was not healthy within {START_TIMEOUT:g}s")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:  # noqa: S310
                return response.status == 200 and json.load(response).get("status") == "ok"
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def stop(self) -> None:
        """SIGTERM to our own PID, SIGKILL after STOP_TIMEOUT."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(STOP_TIMEOUT)
