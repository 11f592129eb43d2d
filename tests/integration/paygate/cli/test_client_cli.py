"""``paygate request`` as an operator runs it: a subprocess against the real paid gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from enclave import SoftwareKey, p256
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings

ROOT = Path(__file__).resolve().parents[4]
CHAT = json.dumps({"model": "fake-llama:latest", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture
def stack(facilitator: Any, seller: str, tmp_path: Path) -> Iterator[Stack]:
    settings = paid_settings(
        seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "ledger.db"
    )
    with ThreadedStack(**settings) as running:
        yield running


@pytest.fixture
def key_file(payer: Any, tmp_path: Path) -> Path:
    path = tmp_path / "wallet.key"
    path.write_text("0x" + payer.key.hex().removeprefix("0x") + "\n")
    path.chmod(0o600)
    return path


def paygate(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "paygate.cli.main", "request", *args],
        capture_output=True,
        text=True,
        input=stdin,
        cwd=ROOT,
        timeout=120,
    )


def test_paid_sealed_request(
    stack: Stack, key_file: Path, usdc: Any, payer: Any, seller: str
) -> None:
    fingerprint = p256.fingerprint(stack.key.public_key)
    url = stack.url + "/v1/chat/completions"
    result = paygate(url, "--data", CHAT, "--pay-with", str(key_file), "--pin", fingerprint)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["object"] == "chat.completion"
    assert f"HTTP 200 (v2, key {fingerprint[:16]}" in result.stderr
    assert "paid 0.001 on eip155:84532" in result.stderr
    assert "settled, transaction 0x" in result.stderr
    assert payer.key.hex().removeprefix("0x") not in result.stderr + result.stdout
    assert usdc.balance_of(seller) == PRICE_ATOMIC


def test_paid_stream_from_stdin_with_v1_envelope_and_x402_v1(
    stack: Stack, key_file: Path, usdc: Any, payer: Any, seller: str
) -> None:
    url = stack.url + "/v1/chat/completions"
    result = paygate(
        url, "--data", "@-", "--stream", "--v1", "--x402-version", "1",
        "--pay-with", str(key_file), stdin=CHAT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("data: ")
    assert "data: [DONE]" in result.stdout
    assert "HTTP 200 (v1" in result.stderr
    assert "paid 0.001 on base-sepolia" in result.stderr
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC


def test_without_a_wallet_the_402_is_shown_and_exits_1(stack: Stack, seller: str) -> None:
    result = paygate(stack.url + "/v1/models")
    assert result.returncode == 1
    assert "HTTP 402" in result.stderr
    assert json.loads(result.stdout)["x402Version"] == 1


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        (["--pin", SoftwareKey.generate().public_key.hex()], "pin_mismatch"),
        (["--max-price", "0.0001"], "spend_refused"),
        (["--data", "{not json"], "client_error"),
    ],
)
def test_client_errors_exit_2_with_their_code(
    stack: Stack, key_file: Path, extra: list[str], code: str
) -> None:
    result = paygate(stack.url + "/v1/models", "--pay-with", str(key_file), *extra)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error [{code}]: ")
    assert "Traceback" not in result.stderr


def test_a_wallet_file_readable_by_others_is_refused(stack: Stack, key_file: Path) -> None:
    key_file.chmod(0o644)
    result = paygate(stack.url + "/v1/models", "--pay-with", str(key_file))
    assert result.returncode == 2
    assert "error [wallet_key_invalid]" in result.stderr


def test_unreachable_gateway_is_a_request_failure() -> None:
    from paygate_dev.stack import free_port

    result = paygate(f"http://127.0.0.1:{free_port()}/v1/models", "--timeout", "5")
    assert result.returncode == 2
    assert result.stderr.startswith("error [request_failed]: ConnectError")
