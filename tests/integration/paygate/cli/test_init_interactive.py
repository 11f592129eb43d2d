"""A new operator's first run, on a terminal: ``paygate init`` asked question by question (a
real pty, so the hidden prompts are the terminal's) against a real llama-server on a port that
is not llama-server's default, the SDK facilitator and anvil; wrong answers are said why and
asked again without losing the others; then ``paygate doctor`` passes on what init wrote. And
doctor names the likely cause when upstream_kind does not match what answers."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

from paygate.config import load_settings
from paygate.upstream.engines.base import file_digest
from tests.fixtures.components import free_port

PAYGATE = str(Path(sys.executable).with_name("paygate"))


def _env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")}
    base.pop("CREDENTIALS_DIRECTORY", None)
    return {**base, "TERM": "dumb", **extra}


class Terminal:
    """A command on its own pseudo-terminal (its controlling tty, as an operator's shell
    gives it): ``expect`` what it writes, ``answer`` a line."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        pid, fd = pty.fork()
        if pid == 0:  # the child: the pty is its stdin, stdout, stderr and /dev/tty
            try:
                os.execve(argv[0], argv, env)  # noqa: S606
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        # Wide enough that no prompt wraps.
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 400, 0, 0))
        self.seen = b""
        self._at = 0

    def _read(self, until: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, until - time.monotonic()))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        self.seen += chunk
        return bool(chunk)

    def expect(self, text: str, timeout: float = 30.0) -> None:
        """Wait (bounded) until ``text`` appears after what was expected before."""
        wanted = text.encode()
        deadline = time.monotonic() + timeout
        while (found := self.seen.find(wanted, self._at)) < 0:
            if time.monotonic() >= deadline or not self._read(deadline):
                tail = self.seen[self._at :].decode(errors="replace")[-3000:]
                raise AssertionError(f"{text!r} did not come; after the last answer:\n{tail}")
        self._at = found + len(wanted)

    def answer(self, line: str) -> None:
        os.write(self.fd, line.encode() + b"\n")

    def finish(self, timeout: float = 60.0) -> int:
        """Read to the end; the exit status (the child is killed if it does not end)."""
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and self._read(deadline):
                pass
            while time.monotonic() < deadline:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
                if pid != 0:
                    return os.waitstatus_to_exitcode(status)
                time.sleep(0.05)
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            raise AssertionError("init did not end: " + self.text()[-2000:])
        finally:
            os.close(self.fd)

    def text(self) -> str:
        return self.seen.decode(errors="replace")


def test_first_run_on_a_terminal_against_llama_server_to_a_passing_doctor(
    tmp_path, tiny_server, facilitator, anvil, seller
) -> None:
    config, creds = tmp_path / "etc" / "paygate.toml", tmp_path / "etc" / "credentials"
    key = tmp_path / "state" / "key.pem"
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("not weights\n")
    listen = f"127.0.0.1:{free_port()}"
    nothing = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    term = Terminal(
        [PAYGATE, "init", "--config", str(config), "--credentials-dir", str(creds)], _env()
    )
    term.expect("listen on [127.0.0.1:8402]: ")
    term.answer("127.0.0.1:99999")
    term.expect("listen on [127.0.0.1:8402]: ")  # said why, asked again
    term.answer(listen)
    term.expect("key backend (software/pkcs11/tpm) [software]: ")
    term.answer("")
    term.expect("key file [/var/lib/paygate/key.pem]: ")
    term.answer(str(key))
    term.expect("key passphrase (empty: none): ")  # hidden: the terminal's own prompt
    term.answer("")
    term.expect("model server URL")
    term.expect(": ")
    term.answer(nothing)
    term.expect(f"nothing answers at {nothing}: keep it anyway? [y/N]: ")
    term.answer("n")
    term.expect("model server URL")
    term.expect(": ")
    term.answer(tiny_server.url)  # llama-server, not on its default port 8080
    term.expect(f"{tiny_server.url} answers like llama-server (tiny)")
    # llama-server names the file it loaded (/props): offered as the answer
    term.expect(f"model file it serves (GGUF; empty: no weights digest) [{tiny_server.model}]: ")
    term.answer(str(not_gguf))
    term.expect("is not a GGUF file")
    term.expect(f"[{tiny_server.model}]: ")
    term.answer("")
    term.expect(f"weights {file_digest(tiny_server.model)}")
    term.expect("payment mode (off/facilitator/chain/verify-only) [off]: ")
    term.answer("facilitator")
    term.expect("wallet that is paid (0x...): ")
    term.answer("0x1234")
    term.expect("wallet that is paid (0x...): ")
    term.answer(seller)
    term.expect("networks (comma-separated) [base]: ")
    term.answer("base-sepolia, nowhere-net")
    term.expect("networks (comma-separated) [base]: ")
    term.answer("base-sepolia")
    term.expect("price per request in USD [0.001]: ")
    term.answer("-1")
    term.expect("price per request in USD [0.001]: ")
    term.answer("0.002")
    term.expect("suggested for test networks: the x402 SDK's default, https://x402.org/facilitator")
    term.expect("facilitator URL [https://x402.org/facilitator]: ")
    term.answer(nothing)
    term.expect("facilitator API key header (empty: none): ")
    term.answer("")
    term.expect(f"{nothing}: unreachable (ClientConnectorError); keep it anyway? [y/N]: ")
    term.answer("")
    term.expect("facilitator URL [https://x402.org/facilitator]: ")
    term.answer(facilitator.url)
    term.expect("facilitator API key header (empty: none): ")
    term.answer("")
    term.expect("chain RPC URL (empty: none): ")
    term.answer(anvil.rpc_url)
    term.expect(f"wrote {config}")
    term.expect("created the software key")
    assert term.finish() == 0, term.text()[-2000:]

    settings = load_settings(config)
    assert settings.listen == listen  # the first, refused answer was not kept
    assert settings.key_file == key
    assert settings.upstream_url == tiny_server.url
    assert settings.upstream_kind == "llama-server"
    assert settings.upstream_model_path == tiny_server.model
    assert settings.upstream_model_name == "tiny"
    assert settings.pay_to == seller
    assert settings.network == ["base-sepolia"]
    assert str(settings.price) == "0.002"
    assert settings.facilitator_url == facilitator.url
    assert settings.chain_rpc_url == anvil.rpc_url
    doctor = subprocess.run(
        [PAYGATE, "--config", str(config), "doctor", "--json"],
        env=_env(PAYGATE_LEDGER_PATH=str(tmp_path / "state" / "payments.db")),
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 0, checks
    assert {"config", "key", "upstream", "model", "facilitator", "chain", "ledger"} <= set(checks)
    assert file_digest(tiny_server.model) in checks["model"]["detail"]  # the weights, named


def test_doctor_names_the_kind_that_answers(tmp_path, tiny_server) -> None:
    # What init used to write for a llama-server: no upstream_kind, so the default (ollama).
    config = tmp_path / "paygate.toml"
    config.write_text(f'upstream_url = "{tiny_server.url}"\nkey_file = "{tmp_path / "k.pem"}"\n')
    doctor = subprocess.run(
        [PAYGATE, "--config", str(config), "doctor", "--json"],
        env=_env(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    checks = {c["check"]: c for c in json.loads(doctor.stdout)}
    assert doctor.returncode == 1
    assert checks["upstream"]["ok"] is False
    assert checks["upstream"]["fix"] == (
        f"the server at {tiny_server.url} answers like llama-server: set upstream_kind = "
        '"llama-server"'
    )
