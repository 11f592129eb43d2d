"""The design's main shape: the real llama-server isolated in its container, and payments.

The proxy and the health monitor reach the model server through the relay's unix socket; the
payment step's calls (the facilitator's /verify, /settle, /supported) and the chain RPC must
leave on their own TCP connections. Tested with the official SDK's facilitator over http and
over https (a TLS front with a certificate from a local CA), exact and upto, and in chain mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from paygate_dev.docker_stack import Dockerd
from paygate_dev.llama import TINY_REPLY, LlamaBuild
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.docker import DockerImages
from tests.fixtures.payment_support import paid_settings, receipt_of
from tests.fixtures.tls import TlsFront, make_ca
from tests.fixtures.upstream_support import Gateway, container_settings, running_gateway
from tests.fixtures.upto_support import charge, receipt_header, sdk_upto_client, upto_settings

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}
PRICE_ATOMIC = 1000  # the default price, 0.001 USDC


@pytest.fixture
def container(
    dockerd: Dockerd, test_images: DockerImages, llama_image: str, llama: LlamaBuild
) -> Any:
    """Settings of a container-mode gateway serving the tiny model, plus ``overrides``."""

    def make(**overrides: Any) -> Any:
        return container_settings(
            dockerd,
            test_images,
            upstream_kind="llama-server",
            upstream_image=llama_image,
            upstream_model_path=llama.tiny,
            upstream_model_name="tiny",
            upstream_cpus=1.0,
            **overrides,
        )

    return make


@contextlib.asynccontextmanager
async def _gateway(settings: Any) -> AsyncIterator[Gateway]:
    async with running_gateway(settings) as gw:
        assert gw.settings.upstream_mode == "container"
        yield gw


def _exact_client(payer: Any) -> x402HttpxClient:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    return x402HttpxClient(client, timeout=60)


async def _pay_exact(gw: Gateway, payer: Any) -> None:
    async with _exact_client(payer) as client:
        response = await client.post(gw.url + CHAT, json=BODY)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == TINY_REPLY
    assert receipt_of(response.headers)["success"] is True


async def _pay_upto(gw: Gateway, payer: Any) -> int:
    """One metered request; the amount it settled."""
    async with sdk_upto_client(payer) as client:
        response = await client.post(gw.url + CHAT, json=BODY)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["choices"][0]["message"]["content"] == TINY_REPLY
    usage = reply["usage"]
    receipt = receipt_header(response.headers)
    assert receipt["success"] is True
    assert receipt["amount"] == str(charge(usage["prompt_tokens"], usage["completion_tokens"]))
    return int(receipt["amount"])


async def test_an_http_facilitator_is_reached_by_tcp_not_through_the_model_servers_socket(
    container: Any, facilitator: Any, usdc: Any, upto_payer: Any, seller: str, tmp_path: Path
) -> None:
    payments = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "payments.db",
        **upto_settings(),
    )
    # upto asks the facilitator's GET /supported at start: through the relay it never could.
    async with _gateway(container(**payments)) as gw:
        await _pay_exact(gw, upto_payer)
        charged = await _pay_upto(gw, upto_payer)
    assert facilitator.stats.calls("supported") >= 1
    assert facilitator.stats.calls("verify") == 2
    assert facilitator.stats.calls("settle") == 2
    assert usdc.balance_of(seller) == PRICE_ATOMIC + charged
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS - PRICE_ATOMIC - charged


async def test_an_https_facilitator_on_a_private_ca_is_verified_and_reached(
    container: Any,
    facilitator: Any,
    usdc: Any,
    upto_payer: Any,
    seller: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ca = make_ca(tmp_path / "ca")
    # The operator's way to trust a private CA (read when the gateway starts).
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.ca_file))
    with TlsFront(ca, facilitator.port) as front:
        payments = paid_settings(
            seller=seller,
            facilitator_url=front.url,
            ledger=tmp_path / "payments.db",
            **upto_settings(),
        )
        async with _gateway(container(**payments)) as gw:
            await _pay_exact(gw, upto_payer)
            charged = await _pay_upto(gw, upto_payer)
        assert front.connections >= 1
    assert facilitator.stats.calls("verify") == 2
    assert facilitator.stats.calls("settle") == 2
    assert usdc.balance_of(seller) == PRICE_ATOMIC + charged


async def test_an_https_facilitator_with_an_untrusted_certificate_is_refused(
    container: Any, facilitator: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    ca = make_ca(tmp_path / "ca")  # not trusted by the gateway: the system store only
    with TlsFront(ca, facilitator.port) as front:
        payments = paid_settings(
            seller=seller, facilitator_url=front.url, ledger=tmp_path / "payments.db"
        )
        async with _gateway(container(**payments)) as gw, _exact_client(payer) as client:
            response = await client.post(gw.url + CHAT, json=BODY)
    assert response.status_code == 503
    assert response.headers["X-Paygate-Error"] == "payment_verifier_unavailable"
    assert facilitator.stats.calls("verify") == 0


async def test_chain_mode_settles_from_a_container_mode_gateway(
    container: Any, anvil: Any, usdc: Any, payer: Any, seller: str, gas_key: Any, tmp_path: Path
) -> None:
    payments = paid_settings(
        seller=seller,
        facilitator_url=None,
        ledger=tmp_path / "payments.db",
        payment_mode="chain",
        chain_rpc_url=anvil.rpc_url,
        gas_key=gas_key.key,
    )
    async with _gateway(container(**payments)) as gw:
        await _pay_exact(gw, payer)
        await _pay_exact(gw, payer)
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
