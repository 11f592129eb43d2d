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
import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from paygate_dev.stack import Swtpm

from enclave.keys.tpm import TpmKey
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
from tests.fixtures.payterms_support import (
    ATTACKER,
    OTHER_TOKEN,
    Edit,
    PayTermsProxy,
    double,
    rewrite_402,
    set_field,
)
from tests.fixtures.swtpm import EkCa
from tests.fixtures.upto_support import upto_settings

MODEL = "fake-llama:latest"
WEIGHTS = b"fake-llama weights"
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
MESSAGES = [{"role": "user", "content": "pay only the attested appliance"}]
SPEND = SpendPolicy(
    max_per_request="1", max_total="5", networks=["base-sepolia"], max_price_per_million="400"
)


# (scheme, x402 version, field) → (the rewrite, the refusal's code)
CASES: dict[tuple[str, int, str], tuple[Edit, str]] = {
    ("exact", 2, "payTo"): (set_field("payTo", ATTACKER), "offer_pay_to_mismatch"),
    ("exact", 2, "network"): (set_field("network", "eip155:8453"), "offer_network_mismatch"),
    ("exact", 2, "asset"): (set_field("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    ("exact", 2, "amount"): (double("amount"), "offer_price_mismatch"),
    ("exact", 2, "extra.name"): (set_field("extra.name", "Fake USD"), "offer_asset_mismatch"),
    ("exact", 2, "extra.version"): (set_field("extra.version", "9"), "offer_asset_mismatch"),
    ("exact", 2, "maxTimeoutSeconds"): (
        set_field("maxTimeoutSeconds", 86_400),
        "offer_timeout_exceeded",
    ),
    ("exact", 1, "payTo"): (set_field("payTo", ATTACKER), "offer_pay_to_mismatch"),
    ("exact", 1, "network"): (set_field("network", "base"), "offer_network_mismatch"),
    ("exact", 1, "asset"): (set_field("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    ("exact", 1, "maxAmountRequired"): (double("maxAmountRequired"), "offer_price_mismatch"),
    ("exact", 1, "extra.name"): (set_field("extra.name", "Fake USD"), "offer_asset_mismatch"),
    ("exact", 1, "extra.version"): (set_field("extra.version", "9"), "offer_asset_mismatch"),
    ("upto", 2, "payTo"): (set_field("payTo", ATTACKER), "offer_pay_to_mismatch"),
    ("upto", 2, "network"): (set_field("network", "eip155:8453"), "offer_network_mismatch"),
    ("upto", 2, "asset"): (set_field("asset", OTHER_TOKEN), "offer_asset_mismatch"),
    ("upto", 2, "amount"): (double("amount"), "offer_maximum_exceeded"),
    ("upto", 2, "extra.name"): (set_field("extra.name", "Fake USD"), "offer_asset_mismatch"),
    ("upto", 2, "extra.facilitatorAddress"): (
        set_field("extra.facilitatorAddress", ATTACKER),
        "offer_facilitator_mismatch",
    ),
    ("upto", 2, "extra.inputPricePerMillionTokens"): (
        set_field("extra.inputPricePerMillionTokens", "1"),
        "offer_token_price_mismatch",
    ),
    ("upto", 2, "extra.outputPricePerMillionTokens"): (
        set_field("extra.outputPricePerMillionTokens", "4000"),
        "offer_token_price_mismatch",
    ),
}


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
