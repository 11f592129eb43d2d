"""Pay only the attested party: a hostile middlebox rewrites the 402 and nothing is signed.

The real gateway on a TPM key (swtpm, EK certificates from a local CA) offers x402 payments on
anvil through the SDK facilitator, `exact` or `upto`; its binding document carries its whole
payment terms. A real reverse proxy on 127.0.0.1 stands between the client and the gateway and
rewrites one field of every 402 that passes (v2 ``PAYMENT-REQUIRED`` header or v1 body). The
client (sync and async transports, the OpenAI SDK) attests through the same proxy (attestation
passes untouched) and must refuse each rewritten offer with its own code before signing: no
payment in the transport's log, nothing spent, no payment header ever sent, balances unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web
from paygate_dev.stack import Swtpm

from enclave.keys.tpm import TpmKey
from paygate import wire
from paygate.client import (
    AsyncPaygateTransport,
    AttestationPolicy,
    ClientError,
    PaygateTransport,
    SpendPolicy,
)
from tests.fixtures.attestation_support import ollama_models_dir
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import paid_settings
from tests.fixtures.swtpm import EkCa
from tests.fixtures.upto_support import upto_settings

MODEL = "fake-llama:latest"
WEIGHTS = b"fake-llama weights"
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
MESSAGES = [{"role": "user", "content": "pay only the attested appliance"}]
ATTACKER = "0x" + "a7" * 20
OTHER_TOKEN = "0x" + "77" * 20
SPEND = SpendPolicy(
    max_per_request="1", max_total="5", networks=["base-sepolia"], max_price_per_million="400"
)
_HOP = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}
)

Edit = Callable[[dict[str, Any]], None]


def _set(field: str, value: Any) -> Edit:
    def edit(offer: dict[str, Any]) -> None:
        if field.startswith("extra."):
            offer.setdefault("extra", {})[field.removeprefix("extra.")] = value
        else:
            offer[field] = value

    return edit


def _double(field: str) -> Edit:
    def edit(offer: dict[str, Any]) -> None:
        offer[field] = str(int(offer[field]) * 2)

    return edit


# (scheme, x402 version, field) → (the rewrite, the refusal's code)
CASES: dict[tuple[str, int, str], tuple[Edit, str]] = {
    ("exact", 2, "payTo"): (_set("payTo", ATTACKER), "offer_pay_to_mismatch"),
    ("exact", 2, "network"): (_set("network", "eip155:8453"), "offer_network_mismatch"),
    ("exact", 2, "asset"): (_set("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    ("exact", 2, "amount"): (_double("amount"), "offer_price_mismatch"),
    ("exact", 2, "extra.name"): (_set("extra.name", "Fake USD"), "offer_asset_mismatch"),
    ("exact", 2, "extra.version"): (_set("extra.version", "9"), "offer_asset_mismatch"),
    ("exact", 2, "maxTimeoutSeconds"): (
        _set("maxTimeoutSeconds", 86_400),
        "offer_timeout_exceeded",
    ),
    ("exact", 1, "payTo"): (_set("payTo", ATTACKER), "offer_pay_to_mismatch"),
    ("exact", 1, "network"): (_set("network", "base"), "offer_network_mismatch"),
    ("exact", 1, "asset"): (_set("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    ("exact", 1, "maxAmountRequired"): (_double("maxAmountRequired"), "offer_price_mismatch"),
    ("exact", 1, "extra.name"): (_set("extra.name", "Fake USD"), "offer_asset_mismatch"),
    ("exact", 1, "extra.version"): (_set("extra.version", "9"), "offer_asset_mismatch"),
    ("upto", 2, "payTo"): (_set("payTo", ATTACKER), "offer_pay_to_mismatch"),
    ("upto", 2, "network"): (_set("network", "eip155:8453"), "offer_network_mismatch"),
    ("upto", 2, "asset"): (_set("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    ("upto", 2, "amount"): (_double("amount"), "offer_maximum_exceeded"),
    ("upto", 2, "extra.name"): (_set("extra.name", "Fake USD"), "offer_asset_mismatch"),
    ("upto", 2, "extra.facilitatorAddress"): (
        _set("extra.facilitatorAddress", ATTACKER),
        "offer_facilitator_mismatch",
    ),
    ("upto", 2, "extra.inputPricePerMillionTokens"): (
        _set("extra.inputPricePerMillionTokens", "1"),
        "offer_token_price_mismatch",
    ),
    ("upto", 2, "extra.outputPricePerMillionTokens"): (
        _set("extra.outputPricePerMillionTokens", "4000"),
        "offer_token_price_mismatch",
    ),
}


def rewrite_402(version: int, edit: Edit) -> Callable[[dict[str, str], bytes], bytes]:
    """Rewrite every offer of the 402's v2 header (edits ``headers``) or v1 body."""

    def rewrite(headers: dict[str, str], body: bytes) -> bytes:
        if version == 2:
            name = next(k for k in headers if k.lower() == wire.PAYMENT_REQUIRED.lower())
            document = json.loads(base64.b64decode(headers[name]))
            for offer in document["accepts"]:
                edit(offer)
            headers[name] = base64.b64encode(json.dumps(document).encode()).decode()
            return body
        document = json.loads(body)
        for offer in document["accepts"]:
            edit(offer)
        return json.dumps(document).encode()

    return rewrite


class PayTermsProxy:
    """A reverse proxy on 127.0.0.1 (own thread and loop) in front of ``target``: every 402
    passes through ``rewrite``; ``payments_sent`` counts requests that carried a payment."""

    def __init__(
        self, target: str, rewrite: Callable[[dict[str, str], bytes], bytes] | None
    ) -> None:
        self._target = target
        self._rewrite = rewrite
        self.payments_sent = 0
        self.rewritten = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.url = ""

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

            async def handle(request: web.Request) -> web.Response:
                headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
                if wire.PAYMENT_SIGNATURE in request.headers or wire.X_PAYMENT in request.headers:
                    self.payments_sent += 1
                async with session.request(
                    request.method,
                    self._target + request.path_qs,
                    data=await request.read(),
                    headers=headers,
                ) as upstream:
                    body = await upstream.read()
                    out = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
                    out.pop("Content-Encoding", None)
                if upstream.status == 402 and self._rewrite is not None:
                    body = self._rewrite(out, body)
                    self.rewritten += 1
                return web.Response(status=upstream.status, body=body, headers=out)

            app = web.Application(client_max_size=4 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            host, port = runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    def __enter__(self) -> PayTermsProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def module_seller() -> str:
    from paygate_dev.chain.accounts import new_account

    return new_account().address


def _tpm_key(factory: Callable[[EkCa], Swtpm], ca: EkCa, directory: Path) -> Iterator[TpmKey]:
    tpm = factory(ca)
    with TpmKey.generate(tpm.tcti, directory / "key") as key:
        yield key


def _stack(
    key: TpmKey, facilitator_url: str, seller: str, directory: Path, schemes: list[str]
) -> ThreadedStack:
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator_url,
        ledger=directory / "ledger.db",
        require_encryption=True,
        key_backend="tpm",
        upstream_model_path=ollama_models_dir(
            directory / "models", "fake-llama", "latest", WEIGHTS
        ),
        expected_model_digests={MODEL: DIGEST},
        attestation_rate_per_minute=100_000,
        attestation_global_rate_per_minute=100_000,
        **(upto_settings(payment_schemes=schemes) if "upto" in schemes else {}),
    )
    return ThreadedStack(key=key, **settings)


@pytest.fixture(scope="module")
def stacks(
    ek_swtpm_factory: Callable[[EkCa], Swtpm],
    ek_ca: EkCa,
    facilitator_server: Any,
    module_seller: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, Stack]]:
    """One gateway per scheme, each on its own TPM (each measures itself into its PCR 23)."""
    running: dict[str, Stack] = {}
    keys = []
    contexts = []
    try:
        for scheme in ("exact", "upto"):
            directory = tmp_path_factory.mktemp(scheme)
            key_iter = _tpm_key(ek_swtpm_factory, ek_ca, directory)
            keys.append(key_iter)
            context = _stack(
                next(key_iter), facilitator_server.url, module_seller, directory, [scheme]
            )
            contexts.append(context)
            running[scheme] = context.__enter__()
        yield running
    finally:
        for context in reversed(contexts):
            context.__exit__(None, None, None)
        for key_iter in keys:
            next(key_iter, None)


def _policy(ek_ca: EkCa, seller: str) -> AttestationPolicy:
    return AttestationPolicy.from_files(ek_ca.chain_pem, model_digests={DIGEST}, pay_to=seller)


def _call(driver: str, url: str, **options: Any) -> tuple[Any, Any]:
    """One chat completion through ``driver``: (the transport, the reply or the ClientError)."""
    body = {"model": MODEL, "messages": MESSAGES}
    if driver == "async":
        transport: Any = AsyncPaygateTransport(**options)

        async def run() -> Any:
            async with httpx.AsyncClient(transport=transport, timeout=30) as client:
                return await client.post(url + "/v1/chat/completions", json=body)

        try:
            return transport, asyncio.run(run())
        except ClientError as exc:
            return transport, exc
    transport = PaygateTransport(**options)
    try:
        if driver == "openai":
            client = openai.OpenAI(
                base_url=url + "/v1",
                api_key="unused",
                max_retries=0,
                http_client=httpx.Client(transport=transport, timeout=30),
            )
            return transport, client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        with httpx.Client(transport=transport, timeout=30) as http:
            return transport, http.post(url + "/v1/chat/completions", json=body)
    except ClientError as exc:
        return transport, exc


@pytest.mark.parametrize("driver", ["sync", "async", "openai"])
@pytest.mark.parametrize("case", list(CASES), ids=["-".join(map(str, c)) for c in CASES])
def test_a_rewritten_402_is_refused_before_anything_is_signed(
    stacks: dict[str, Stack],
    ek_ca: EkCa,
    usdc: Any,
    upto_payer: Any,
    module_seller: str,
    case: tuple[str, int, str],
    driver: str,
) -> None:
    scheme, version, _ = case
    edit, code = CASES[case]
    stack = stacks[scheme]
    seller_before = usdc.balance_of(module_seller)
    served_before = sum(stack.fake.hits.values())
    with PayTermsProxy(stack.url, rewrite_402(version, edit)) as proxy:
        transport, outcome = _call(
            driver,
            proxy.url,
            wallet=upto_payer,
            spend=SPEND,
            attestation=_policy(ek_ca, module_seller),
            x402_version=version,
        )
        assert isinstance(outcome, ClientError), outcome
        assert outcome.code == code, (outcome.code, str(outcome))
        assert proxy.rewritten == 1  # the 402 really passed through the rewrite
        assert proxy.payments_sent == 0  # no authorization reached the gateway
    assert transport.payments == []  # the wallet signed nothing
    assert transport.spent == 0
    assert transport.attested(proxy.url) is not None  # attestation itself passed
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS
    assert usdc.balance_of(module_seller) == seller_before
    assert usdc.balance_of(ATTACKER) == 0
    assert sum(stack.fake.hits.values()) == served_before  # nothing was served either


@pytest.mark.parametrize(("scheme", "version"), [("exact", 2), ("exact", 1), ("upto", 2)])
def test_the_same_402_untouched_is_paid_through_the_proxy(
    stacks: dict[str, Stack],
    ek_ca: EkCa,
    usdc: Any,
    upto_payer: Any,
    module_seller: str,
    scheme: str,
    version: int,
) -> None:
    """The control: through the same proxy, unrewritten, every scheme and version is paid."""
    seller_before = usdc.balance_of(module_seller)
    with PayTermsProxy(stacks[scheme].url, None) as proxy:
        transport, outcome = _call(
            "openai",
            proxy.url,
            wallet=upto_payer,
            spend=SPEND,
            attestation=_policy(ek_ca, module_seller),
            x402_version=version,
        )
        assert not isinstance(outcome, Exception), outcome
        assert proxy.payments_sent == 1
    (record,) = transport.payments
    assert record.scheme == scheme
    assert record.x402_version == version
    assert record.settled
    paid = usdc.balance_of(module_seller) - seller_before
    assert paid > 0
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS - paid


def test_without_attestation_the_spend_policy_pay_to_allow_list_refuses_a_rewritten_payee(
    stacks: dict[str, Stack], usdc: Any, upto_payer: Any, module_seller: str
) -> None:
    """A caller without an AttestationPolicy names the wallets it pays: a payTo rewrite is
    declined with its own code, before signing; the genuine payee is paid."""
    allow = SpendPolicy(max_per_request="1", networks=["base-sepolia"], pay_to=[module_seller])
    edit, _ = CASES[("exact", 2, "payTo")]
    with PayTermsProxy(stacks["exact"].url, rewrite_402(2, edit)) as proxy:
        transport, outcome = _call("sync", proxy.url, wallet=upto_payer, spend=allow)
        assert isinstance(outcome, ClientError)
        assert outcome.code == "pay_to_not_allowed"
        assert proxy.payments_sent == 0
    assert transport.payments == []
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS
    with PayTermsProxy(stacks["exact"].url, None) as proxy:
        transport, outcome = _call("sync", proxy.url, wallet=upto_payer, spend=allow)
        assert not isinstance(outcome, Exception)
        assert outcome.status_code == 200
    (record,) = transport.payments
    assert record.pay_to.lower() == module_seller.lower()
