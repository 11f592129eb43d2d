"""Untrusted JSON and secret URLs, through `paygate serve` as a real process on a real chain:
a 100,000-deep body or a 5,000-digit integer sent unpaid to a model-priced route is a 400 and
the gateway keeps serving; a facilitator answering such JSON is a 503; a DEBUG log of a paid
chain-mode run holds no part of the RPC URL's credentials."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from paygate import wire
from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import running_stack
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    paid_stack,
    post,
    receipt_of,
    v2_header,
)
from tests.fixtures.serve_support import PAYGATE, make_key, wait_live

DEEP = b"[" * 100_000 + b"]" * 100_000
HUGE = b'{"model": "fake-big", "seed": ' + b"9" * 5000 + b"}"
# Credentials in a hosted RPC URL's query (anvil ignores a query, but answers on "/" only: keys
# in the path are covered by tests/unit/paygate/test_hardening_units.py; userinfo is refused
# outright).
API_KEY, TOKEN = "k3yApiSecret9x7Q", "QrySecret55aa"


def test_the_entry_point_restores_the_recursion_limit() -> None:
    code = "import sys, paygate.cli.main, eth_account, web3; print(sys.getrecursionlimit())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert int(out.stdout) == 1000  # not py_ecc's 100,000


@dataclass
class _Gateway:  # what payment_support's helpers need of a stack
    url: str
    client: aiohttp.ClientSession


async def test_deep_json_and_huge_integers_are_400_and_no_rpc_key_is_logged(
    tmp_path: Path, anvil, usdc, payer, seller, gas_key
) -> None:
    key_file = make_key(tmp_path / "key.pem")
    host_port = anvil.rpc_url.removeprefix("http://")
    rpc_url = f"http://{host_port}/?apikey={API_KEY}&token={TOKEN}"
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "software",
        "PAYGATE_KEY_FILE": str(key_file),
        "PAYGATE_LOG_LEVEL": "DEBUG",
        "PAYGATE_PAYMENT_MODE": "chain",
        "PAYGATE_CHAIN_RPC_URL": rpc_url,
        "PAYGATE_GAS_KEY": gas_key.key,
        "PAYGATE_PAY_TO": seller,
        "PAYGATE_NETWORK": "base-sepolia",
        "PAYGATE_LEDGER_PATH": str(tmp_path / "payments.db"),
        "PAYGATE_MODEL_PRICES": json.dumps({"fake-big": "0.01"}),
        "PAYGATE_SHUTDOWN_GRACE_SECONDS": "5",
    }
    async with running_stack() as s:
        proc = subprocess.Popen(
            [PAYGATE, "serve", "--listen", f"127.0.0.1:{port}", "--upstream-url", s.fake_url],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            await wait_live(url, proc)
            for body in (DEEP, HUGE):
                # With a payment, the model-priced body is judged first: the caller's 400.
                async with s.client.post(
                    url + CHAT,
                    data=body,
                    headers={"Content-Type": "application/json", wire.PAYMENT_SIGNATURE: "e30="},
                ) as response:
                    assert response.status == 400
                    assert response.headers[wire.ERROR_HEADER] == "invalid_json"
                    assert b"999" not in await response.read()
                # Without one it is a probe: the 402 comes before the body is judged.
                async with s.client.post(
                    url + CHAT, data=body, headers={"Content-Type": "application/json"}
                ) as response:
                    assert response.status == 402
                    assert b"999" not in await response.read()
            # Still serving, and paying works: a settled receipt from the chain.
            gateway = _Gateway(url, s.client)
            status, headers, _ = await post(gateway, await v2_header(gateway, payer))
            assert status == 200
            assert receipt_of(headers)["success"] is True
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # by the child's own PID
            _, err = await asyncio.to_thread(proc.communicate, timeout=20)
    log = err.decode()
    assert " DEBUG " in log  # the run really logged at DEBUG
    assert "payment_mode=chain" in log
    for secret in (API_KEY, TOKEN):
        assert secret not in log


@pytest.mark.parametrize("fault", ["deep_json", "huge_number"])
async def test_a_facilitator_answering_hostile_json_is_503(
    facilitator, payer, seller, tmp_path, fault
):
    facilitator.set_fault(fault, "verify")
    async with paid_stack(
        seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "payments.db"
    ) as stack:
        status, headers, _ = await post(stack, await v2_header(stack, payer))
        assert status == 503
        assert headers[wire.ERROR_HEADER] == "payment_verifier_unavailable"
        facilitator.reset()
        status, _, _ = await post(stack, await v2_header(stack, payer), json=CHAT_BODY)
        assert status == 200
