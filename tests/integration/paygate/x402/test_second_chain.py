"""A custom EIP-3009 asset on a second chain, paid end to end.

A second anvil runs with another chain id (31337, in no table of ours or the SDK's), Circle's
FiatToken V2.2 deployed there under its own name ("Paygate Test Dollar", version "2"). The
gateway is configured for that network and asset only (``PAYGATE_NETWORK=eip155:31337`` +
``PAYGATE_ASSET_*``); the official SDK's client (the asset explicitly allowed in its spend
controls, as a wallet must) pays, settled by the SDK facilitator on that chain or by the gateway
itself (chain mode). The Base Sepolia chain beside it is never touched, and a signature made for
another chain's domain is refused before any network call.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
from paygate_dev.chain.accounts import FACILITATOR, GATEWAY_GAS, new_account
from paygate_dev.chain.anvil import Anvil
from paygate_dev.chain.build import load_contract
from paygate_dev.chain.constants import MULTICALL3_ADDRESS
from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.exact import register_exact_evm_client

from paygate import wire
from paygate.x402.ledger import PaymentState
from tests.fixtures.chain import PAYER_FUNDS, encode_header, sign_v2_payment
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    challenge_of,
    paid_stack,
    post,
    receipt_of,
    records,
)

CHAIN_ID = 31337
NETWORK = f"eip155:{CHAIN_ID}"
NAME = "Paygate Test Dollar"
PRICE = "0.25"  # 250_000 atomic units of a 6-decimal token


@pytest.fixture(scope="module")
def chain_b(tmp_path_factory) -> Iterator[Anvil]:
    chain = Anvil(chain_id=CHAIN_ID, log_path=tmp_path_factory.mktemp("anvil_b") / "anvil.log")
    chain.start()
    try:
        chain.set_code(MULTICALL3_ADDRESS, load_contract("Multicall3").deployed_bytecode)
        yield chain
    finally:
        chain.stop()


@pytest.fixture(scope="module")
def dollar(chain_b) -> str:
    return chain_b.deploy_fiat_token(NAME, "PTD")


@pytest.fixture(scope="module")
def facilitator_b(chain_b) -> Iterator[FacilitatorServer]:
    settings = FacilitatorSettings(
        rpc_url=chain_b.rpc_url, private_key=chain_b.accounts[FACILITATOR].key, network=NETWORK
    )
    server = FacilitatorServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def payer_b(chain_b, dollar, anvil):
    """Funded on both chains: only the second one may move."""
    account = new_account()
    chain_b.mint(account.address, PAYER_FUNDS, dollar)
    anvil.mint(account.address, PAYER_FUNDS)
    return account


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


def custom_asset(dollar: str, **extra) -> dict:
    return {
        "network": NETWORK,
        "asset_address": dollar,
        "asset_name": NAME,
        "asset_version": "2",
        "asset_decimals": 6,
        "price": PRICE,
        **extra,
    }


def sdk_client(payer, dollar: str) -> x402HttpxClient:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(payer))
    # A wallet pays only assets it knows: this one is allowed by name, capped.
    client.set_spend_controls(
        {
            "allowed_assets": [
                {"network": NETWORK, "asset": dollar, "max_amount_per_payment": "1000000"}
            ]
        }
    )
    return x402HttpxClient(client, timeout=30)


@pytest.mark.parametrize("mode", ["facilitator", "chain"])
async def test_a_custom_asset_on_a_second_chain_is_paid_end_to_end(
    chain_b, dollar, facilitator_b, anvil, usdc, payer_b, seller, ledger, mode
):
    if mode == "chain":
        extra = {
            "payment_mode": "chain",
            "facilitator_url": None,
            "gas_key": chain_b.accounts[GATEWAY_GAS].key,
        }
    else:
        extra = {"facilitator_url": facilitator_b.url}
    settings = custom_asset(dollar, chain_rpc_url=chain_b.rpc_url, **extra)
    async with (
        paid_stack(seller=seller, ledger=ledger, **settings) as stack,
        sdk_client(payer_b, dollar) as client,
    ):
        required = await challenge_of(stack)
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
    (offer,) = required["accepts"]
    assert (offer["network"], offer["asset"], offer["amount"]) == (NETWORK, dollar, "250000")
    assert offer["extra"] == {"name": NAME, "version": "2"}
    receipt = receipt_of(response.headers)
    assert (receipt["success"], receipt["network"]) == (True, NETWORK)
    assert chain_b.balance_of(seller, dollar) == 250_000
    assert chain_b.balance_of(payer_b.address, dollar) == PAYER_FUNDS - 250_000
    assert usdc.balance_of(payer_b.address) == PAYER_FUNDS  # the other chain: untouched
    assert chain_b.wait_for_receipt(receipt["transaction"])["status"] == 1
    (record,) = await records(ledger)
    assert (record.network, record.state) == (NETWORK, PaymentState.SETTLED)
    assert record.asset == dollar


async def test_a_signature_for_another_chains_domain_is_refused_locally(
    chain_b, dollar, facilitator_b, payer_b, seller, ledger
):
    settings = custom_asset(dollar, facilitator_url=facilitator_b.url)
    facilitator_b.reset()
    async with paid_stack(seller=seller, ledger=ledger, **settings) as stack:
        required = await challenge_of(stack)
        (offer,) = required["accepts"]
        # Signed under chain 84532's EIP-712 domain, then presented as this chain's payment.
        elsewhere = sign_v2_payment(payer_b, {**offer, "network": "eip155:84532"})
        replayed = copy.deepcopy(elsewhere)
        replayed["accepted"]["network"] = NETWORK
        answers = [await post(stack, encode_header(p)) for p in (elsewhere, replayed)]
        served = stack.fake.hits["POST /v1/chat/completions"]
    assert [status for status, _, _ in answers] == [402, 402]
    assert [h[wire.ERROR_HEADER] for _, h, _ in answers] == [
        "invalid_network",
        "invalid_exact_evm_payload_signature",
    ]
    assert served == 0
    assert facilitator_b.stats.verify_calls == 0
    assert chain_b.balance_of(payer_b.address, dollar) == PAYER_FUNDS


async def test_chain_mode_refuses_an_rpc_of_another_chain(
    anvil, usdc, dollar, gas_key, payer_b, seller, ledger
):
    # Configured for chain 31337 but pointed at the Base Sepolia node: no state of that chain
    # proves anything here, so the payment is not taken (503), and nothing moves anywhere.
    settings = custom_asset(
        dollar,
        payment_mode="chain",
        facilitator_url=None,
        chain_rpc_url=anvil.rpc_url,
        gas_key=gas_key.key,
    )
    async with (
        paid_stack(seller=seller, ledger=ledger, **settings) as stack,
        sdk_client(payer_b, dollar) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
    assert response.status_code == 503
    assert response.headers[wire.ERROR_HEADER] == "payment_verifier_unavailable"
    assert usdc.balance_of(payer_b.address) == PAYER_FUNDS
