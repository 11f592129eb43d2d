"""``paygate deploy ...`` and ``paygate serve NAME`` as an operator runs them (real processes)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from paygate.cli.main import main as cli
from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import running_stack

PAYGATE = str(Path(sys.executable).with_name("paygate"))


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_DEPLOYMENTS_DIR": str(tmp_path / "inference"),
        "PAYGATE_KEY_BACKEND": "software",
        "PAYGATE_KEY_FILE": str(tmp_path / "key.pem"),
    }


class Cli:
    """``paygate ...`` in this process (the subprocess start costs seconds of imports)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        code = cli(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err


@pytest.fixture
def paygate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Cli:
    for name in [n for n in os.environ if n.startswith("PAYGATE_")]:
        monkeypatch.delenv(name)
    for name, value in _env(tmp_path).items():
        if name.startswith("PAYGATE_"):
            monkeypatch.setenv(name, value)
    return Cli(capsys)


def test_deploy_create_list_show_update_delete(tmp_path: Path, paygate: Cli) -> None:
    code, out, err = paygate("deploy", "create", "demo", "--price", "0.002", "--no-payment-gate")
    assert code == 0, err
    assert json.loads(out)["price_per_request"] == "0.002"
    assert (tmp_path / "inference" / "demo" / "config.json").stat().st_mode & 0o777 == 0o600
    code, _, err = paygate("deploy", "create", "demo")
    assert code == 2
    assert err.strip() == "error [deployment_exists]: deployment demo exists (use --force)"
    _, out, _ = paygate("deploy", "list")
    assert out.splitlines()[1].split()[:2] == ["demo", "attach"]
    _, out, _ = paygate("deploy", "update", "demo", "--listen", "127.0.0.1:9999")
    assert json.loads(out)["listen"] == "127.0.0.1:9999"
    shown = json.loads(paygate("deploy", "show", "demo")[1])
    assert shown["listen"] == "127.0.0.1:9999"
    assert shown["no_payment_gate"] is True
    _, out, _ = paygate("deploy", "update", "demo", "--payment-gate")
    assert json.loads(out)["no_payment_gate"] is False
    assert paygate("deploy", "delete", "demo")[0] == 0
    code, _, err = paygate("deploy", "show", "demo")
    assert err.strip() == "error [deployment_not_found]: no deployment named demo"


def test_deploy_refuses_bad_input_with_a_code_and_no_traceback(
    tmp_path: Path, paygate: Cli
) -> None:
    for args, code in (
        (("create", "../evil"), "invalid_deployment_name"),
        (("create", "Bad"), "invalid_deployment_name"),
        (("create", "ok", "--price", "-1"), "invalid_deployment"),
        (("create", "ok", "--mode", "vm"), "invalid_deployment"),
    ):
        status, _, err = paygate("deploy", *args)
        assert status == 2, args
        assert err.startswith(f"error [{code}]:"), err
        assert "Traceback" not in err
    assert not (tmp_path / "evil").exists()


async def test_serve_name_runs_the_named_deployment(tmp_path: Path, paygate: Cli) -> None:
    assert paygate("keys", "create", "--backend", "software")[0] == 0
    port = free_port()
    async with running_stack() as s:
        code, _, err = paygate(
            "deploy", "create", "local",
            "--listen", f"127.0.0.1:{port}", "--upstream-url", s.fake_url, "--no-payment-gate",
        )  # fmt: skip
        assert code == 0, err
        proc = subprocess.Popen(
            [PAYGATE, "serve", "local"],
            env=_env(tmp_path),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as client:
                async with asyncio.timeout(20):
                    while True:
                        assert proc.poll() is None, "paygate serve exited early"
                        try:
                            async with client.get(f"http://127.0.0.1:{port}/health/ready") as r:
                                if r.status == 200:
                                    body = await r.json()
                                    break
                        except aiohttp.ClientError:
                            pass
                        await asyncio.sleep(0.1)
                assert body["upstream"]["state"] == "ready"
                chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                async with client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=chat
                ) as r:
                    assert r.status == 200
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert proc.returncode == 0
