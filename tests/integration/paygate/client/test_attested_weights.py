"""Real weights attested: SmolLM2-135M-Instruct (llama.cpp's llama-server) under a client's
``model_digests`` policy, in attach mode (TPM evidence from swtpm, paid on anvil) and in
container mode (the private dockerd runs the server with the weights mounted read-only).

The digest the gateway binds is that of the GGUF bytes it hashed at start, the file the server
loads; a policy naming that digest is accepted and the reply comes back; a policy naming any
other digest is refused with ``model_not_accepted`` before anything is sealed or paid.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from paygate_dev.docker_stack import Dockerd
from paygate_dev.llama import LlamaBuild, LlamaServer
from paygate_dev.stack import Swtpm

from enclave.keys.tpm import TpmKey
from paygate.client import (
    AsyncPaygateTransport,
    AttestationPolicy,
    ClientError,
    PaygateTransport,
    SpendPolicy,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.docker import DockerImages
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings
from tests.fixtures.swtpm import EkCa
from tests.fixtures.upstream_support import container_settings, running_gateway

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France? One word."}]
SAMPLING: dict[str, Any] = {"temperature": 0, "seed": 42, "max_tokens": 4}
OTHER = "sha256:" + "00" * 32
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])


def _weights(llama: LlamaBuild) -> str:
    return "sha256:" + hashlib.sha256(llama.smollm2.read_bytes()).hexdigest()


class Counting(httpx.BaseTransport):
    """The wire below the client: counts what the client actually sent to inference routes."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.sent: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/chat"):
            self.sent.append(request.url.path)
        return self._inner.handle_request(request)


class AsyncCounting(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.startswith("/v1/chat"):
            self.sent.append(request.url.path)
        return await self._inner.handle_async_request(request)


def _sdk(url: str, transport: httpx.BaseTransport) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=120),
    )


@pytest.fixture
def tpm_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path: Path
) -> Iterator[TpmKey]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path / "key") as key:
        yield key


def test_attach_mode_real_weights_accepted_and_another_digest_refused_before_paying(
    smollm2_server: LlamaServer,
    llama: LlamaBuild,
    tpm_key: TpmKey,
    ek_ca: EkCa,
    facilitator: Any,
    seller: str,
    payer: Any,
    usdc: Any,
    tmp_path: Path,
) -> None:
    digest = _weights(llama)
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "ledger.db",
        require_encryption=True,
        key_backend="tpm",
        upstream_url=smollm2_server.url,
        upstream_kind="llama-server",
        upstream_model_path=llama.smollm2,
        upstream_model_name=MODEL,
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
    )
    with ThreadedStack(key=tpm_key, **settings) as stack:
        wire = Counting()
        accepted = PaygateTransport(
            transport=wire,
            wallet=payer,
            spend=SPEND,
            attestation=AttestationPolicy.from_files(
                ek_ca.chain_pem, model_digests={digest}, pay_to=seller
            ),
        )
        reply = _sdk(stack.url, accepted).chat.completions.create(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            **SAMPLING,
        )
        assert reply.choices[0].message.content
        attested = accepted.attested(stack.url)
        assert attested is not None
        assert attested.kind == "tpm"
        assert attested.binding.model_digest(MODEL) == digest
        assert usdc.balance_of(seller) == PRICE_ATOMIC

        wire = Counting()
        refused = PaygateTransport(
            transport=wire,
            wallet=payer,
            spend=SPEND,
            attestation=AttestationPolicy.from_files(
                ek_ca.chain_pem, model_digests={OTHER}, pay_to=seller
            ),
        )
        with pytest.raises(ClientError) as caught:
            _sdk(stack.url, refused).chat.completions.create(model=MODEL, messages=QUESTION)  # type: ignore[arg-type]
        assert caught.value.code == "model_not_accepted"
        assert wire.sent == []  # nothing sealed, nothing sent
        assert refused.payments == []  # nothing signed
        assert usdc.balance_of(seller) == PRICE_ATOMIC
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC


@pytest.mark.asyncio
async def test_container_mode_real_weights_accepted_and_another_digest_refused(
    dockerd: Dockerd, test_images: DockerImages, llama_image: str, llama: LlamaBuild
) -> None:
    digest = _weights(llama)
    settings = container_settings(
        dockerd,
        test_images,
        upstream_kind="llama-server",
        upstream_image=llama_image,
        upstream_model_path=llama.smollm2,
        upstream_model_name=MODEL,
        upstream_cpus=1.0,
        upstream_memory="1g",
        upstream_ready_timeout=120.0,
        require_encryption=True,
    )
    async with running_gateway(settings) as gw:
        # A software key: kind none, accepted only when the policy allows it; the weights
        # check is the same for every evidence kind.
        wire = AsyncCounting()
        accepted = AsyncPaygateTransport(
            transport=wire,
            attestation=AttestationPolicy(model_digests=frozenset({digest}), allow_unattested=True),
        )
        async with httpx.AsyncClient(transport=accepted, timeout=120) as http:
            reply = await http.post(
                gw.url + "/v1/chat/completions",
                json={"model": MODEL, "messages": QUESTION, **SAMPLING},
            )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        attested = accepted.attested(gw.url)
        assert attested is not None
        assert attested.binding.model_digest(MODEL) == digest

        wire = AsyncCounting()
        refused = AsyncPaygateTransport(
            transport=wire,
            attestation=AttestationPolicy(model_digests=frozenset({OTHER}), allow_unattested=True),
        )
        async with httpx.AsyncClient(transport=refused, timeout=120) as http:
            with pytest.raises(ClientError) as caught:
                await http.post(gw.url + "/v1/chat/completions", json={"model": MODEL})
        assert caught.value.code == "model_not_accepted"
        assert wire.sent == []
