"""Smart-wallet payers through the real gateway: Solady's ERC-4337 account (npm), deployed or
still counterfactual (ERC-6492), pays `exact` and `upto` with the official SDK's clients and
signs in with the SDK's sign-in-with-x client; the token (Circle's FiatToken V2.2) and Permit2
(Uniswap's) ask the wallet (ERC-1271) on chain. Facilitator mode (the SDK facilitator) and chain
mode (paygate's own settlement) both; forged and foreign signatures move nothing.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import pytest
from paygate_dev.chain.accounts import SPARE, new_account
from paygate_dev.chain.constants import MULTICALL3_ADDRESS
from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings
from paygate_dev.chain.smart_account import SmartAccount, install_smart_accounts
from x402 import x402Client
from x402.extensions.sign_in_with_x import create_siwx_payload, encode_siwx_header
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.upto import UptoEvmClientScheme

from paygate import wire
from paygate.x402 import smartwallet
from paygate.x402.ledger import PaymentState
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import (
    CHAT,
    CHAT_BODY,
    PRICE_ATOMIC,
    challenge_of,
    paid_stack,
    receipt_of,
    records,
)
from tests.fixtures.upto_support import charge, upto_settings

HITS = "POST /v1/chat/completions"


@pytest.fixture
def ledger(tmp_path):
    return tmp_path / "payments.db"


@pytest.fixture(scope="module")
def factory(anvil) -> str:
    return install_smart_accounts(anvil)


@pytest.fixture(scope="module")
def wallet_facilitator(anvil, factory) -> Iterator[FacilitatorServer]:
    """The SDK facilitator, allowed to deploy wallets through the account factory."""
    settings = FacilitatorSettings(
        rpc_url=anvil.rpc_url,
        private_key=anvil.accounts[SPARE].key,
        eip6492_factories=(factory,),
    )
    server = FacilitatorServer(settings).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def facilitator6492(wallet_facilitator) -> Iterator[FacilitatorServer]:
    wallet_facilitator.reset()
    yield wallet_facilitator
    wallet_facilitator.reset()


@pytest.fixture
def wallet(anvil, factory) -> SmartAccount:
    """A deployed smart account holding PAYER_FUNDS."""
    account = SmartAccount(anvil, new_account())
    account.deploy()
    anvil.mint(account.address, PAYER_FUNDS)
    return account


@pytest.fixture
def counterfactual(anvil, factory) -> SmartAccount:
    """A smart account not deployed yet; its address already holds PAYER_FUNDS."""
    account = SmartAccount(anvil, new_account())
    anvil.mint(account.address, PAYER_FUNDS)
    assert not account.deployed
    return account


def exact_client(signer) -> x402HttpxClient:
    client = x402Client()
    register_exact_evm_client(client, signer)
    return x402HttpxClient(client, timeout=30)


def upto_client(signer) -> x402HttpxClient:
    client = x402Client()
    client.register("eip155:*", UptoEvmClientScheme(signer))
    return x402HttpxClient(client, timeout=30)


def chain_mode(anvil, gas_key, **extra):
    return {
        "facilitator_url": None,
        "payment_mode": "chain",
        "chain_rpc_url": anvil.rpc_url,
        "gas_key": gas_key.key,
        **extra,
    }


def signature_of(record) -> bytes:
    return bytes.fromhex(json.loads(record.payload)["payload"]["signature"][2:])


# --- exact --------------------------------------------------------------------------------


@pytest.mark.parametrize("deployed", [True, False], ids=["deployed", "counterfactual"])
async def test_a_smart_wallet_pays_exact_through_the_sdk_facilitator(
    anvil, usdc, facilitator6492, wallet, counterfactual, seller, ledger, deployed
):
    payer = wallet if deployed else counterfactual
    async with (
        paid_stack(seller=seller, facilitator_url=facilitator6492.url, ledger=ledger) as stack,
        exact_client(payer) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
        receipt = receipt_of(response.headers)
        served = stack.fake.hits[HITS]
    assert receipt["success"] is True
    assert receipt["payer"] == payer.address
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - PRICE_ATOMIC
    assert served == 1
    assert payer.deployed  # the facilitator deployed the counterfactual one through its factory
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    assert record.payer == payer.address
    signature = smartwallet.parse(signature_of(record))
    assert not signature.is_ecdsa  # a contract wallet's signature, judged on chain
    assert (signature.deployment is None) is deployed


@pytest.mark.parametrize("deployed", [True, False], ids=["deployed", "counterfactual"])
async def test_chain_mode_settles_a_smart_wallets_payment(
    anvil, usdc, gas_key, wallet, counterfactual, factory, seller, ledger, deployed
):
    payer = wallet if deployed else counterfactual
    settings = chain_mode(anvil, gas_key, erc6492_factories=[factory])
    async with (
        paid_stack(seller=seller, ledger=ledger, **settings) as stack,
        exact_client(payer) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
    assert receipt_of(response.headers)["success"] is True
    assert usdc.balance_of(seller) == PRICE_ATOMIC
    assert payer.deployed
    (record,) = await records(ledger)
    assert record.state is PaymentState.SETTLED
    tx = anvil.w3.eth.get_transaction(record.transaction)
    # A counterfactual wallet is deployed in the settlement itself: one Multicall3 transaction.
    expected = usdc.address if deployed else MULTICALL3_ADDRESS
    assert tx["to"].lower() == expected.lower()


async def test_chain_mode_deploys_wallets_of_listed_factories_only(
    anvil, usdc, gas_key, counterfactual, seller, ledger
):
    async with (
        paid_stack(seller=seller, ledger=ledger, **chain_mode(anvil, gas_key)) as stack,
        exact_client(counterfactual) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        served = stack.fake.hits[HITS]
    assert response.status_code == 402
    assert response.headers[wire.ERROR_HEADER] == "eip6492_factory_not_allowed"
    assert served == 0
    assert not counterfactual.deployed
    assert usdc.balance_of(seller) == 0
    (record,) = await records(ledger)
    assert record.state is PaymentState.RELEASED  # the authorization stays the payer's


# --- upto ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["facilitator", "chain"])
async def test_a_smart_wallet_pays_upto_what_it_used(
    anvil, usdc, facilitator6492, gas_key, wallet, seller, ledger, mode
):
    wallet.approve_permit2()  # the account itself lets Permit2 move its tokens
    settings = (
        chain_mode(anvil, gas_key) if mode == "chain" else {"facilitator_url": facilitator6492.url}
    )
    async with (
        paid_stack(seller=seller, ledger=ledger, **upto_settings(**settings)) as stack,
        upto_client(wallet) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        assert response.status_code == 200, response.text
    owed = charge(1, 4)
    assert receipt_of(response.headers)["amount"] == str(owed)
    assert usdc.balance_of(seller) == owed
    assert usdc.balance_of(wallet.address) == PAYER_FUNDS - owed
    (record,) = await records(ledger)
    assert (record.scheme, record.state) == ("upto", PaymentState.SETTLED)
    assert len(signature_of(record)) > 65  # ERC-7739 nested: Permit2 asked the wallet


# --- forgeries ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["facilitator", "chain"])
async def test_a_strangers_signature_for_a_wallet_is_refused_by_the_wallet(
    anvil, usdc, facilitator6492, gas_key, wallet, seller, ledger, mode
):
    # Well-formed ERC-7739, but by someone who does not own the wallet: the local check defers
    # it (a contract's signature), the wallet says no on chain, nothing moves.
    forger = SmartAccount(anvil, new_account())
    forger.address = wallet.address
    settings = (
        chain_mode(anvil, gas_key) if mode == "chain" else {"facilitator_url": facilitator6492.url}
    )
    async with (
        paid_stack(seller=seller, ledger=ledger, **settings) as stack,
        exact_client(forger) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
        served = stack.fake.hits[HITS]
    assert response.status_code == 402
    assert response.headers[wire.ERROR_HEADER] == "invalid_exact_evm_payload_signature"
    assert served == 0
    assert usdc.balance_of(wallet.address) == PAYER_FUNDS
    if mode == "facilitator":
        assert facilitator6492.stats.settle_calls == 0


async def test_a_wrapper_deploying_another_wallet_does_not_pay_from_this_one(
    anvil, usdc, gas_key, counterfactual, factory, seller, ledger
):
    # The ERC-6492 wrapper deploys the attacker's own account (a listed factory, a valid call)
    # while the authorization spends the victim's counterfactual address.
    attacker = SmartAccount(anvil, new_account())
    attacker.address = counterfactual.address  # signs "as" the victim, deploys its own
    settings = chain_mode(anvil, gas_key, erc6492_factories=[factory])
    async with (
        paid_stack(seller=seller, ledger=ledger, **settings) as stack,
        exact_client(attacker) as client,
    ):
        response = await client.post(stack.url + CHAT, json=CHAT_BODY)
    assert response.status_code == 402
    assert response.headers[wire.ERROR_HEADER] == "invalid_exact_evm_payload_signature"
    assert usdc.balance_of(counterfactual.address) == PAYER_FUNDS
    assert not counterfactual.deployed


# --- sign-in-with-x -----------------------------------------------------------------------


async def signed_in(stack, signer) -> str:
    required = await challenge_of(stack)
    declared = required["extensions"]["sign-in-with-x"]
    info = {**declared["info"], **declared["supportedChains"][0]}
    return encode_siwx_header(await create_siwx_payload(info, signer, stack.url + CHAT))


async def send_signin(stack, header: str) -> tuple[int, dict]:
    async with stack.client.post(
        stack.url + CHAT, json=CHAT_BODY, headers={wire.SIGN_IN_WITH_X: header}
    ) as response:
        await response.read()
        return response.status, dict(response.headers)


async def test_smart_wallets_sign_in_for_their_free_requests(
    anvil, facilitator6492, wallet, counterfactual, factory, seller, ledger
):
    async with paid_stack(
        seller=seller,
        facilitator_url=facilitator6492.url,
        ledger=ledger,
        free_requests_per_day=1,
        free_requests_per_address_per_day=2,  # two wallets sign in from this one address
        public_url="self",  # a free quota signs in for this gateway's own origin
        chain_rpc_url=anvil.rpc_url,
        erc6492_factories=[factory],
    ) as stack:
        deployed = await send_signin(stack, await signed_in(stack, wallet))
        undeployed = await send_signin(stack, await signed_in(stack, counterfactual))
        again = await send_signin(stack, await signed_in(stack, wallet))
        served = stack.fake.hits[HITS]
    assert deployed[0] == 200, deployed
    assert deployed[1][wire.FREE_REMAINING_HEADER] == "0"
    assert undeployed[0] == 200, undeployed  # ERC-6492: deployed only inside an eth_call
    assert not counterfactual.deployed
    assert again[0] == 402
    assert again[1][wire.ERROR_HEADER] == "free_quota_exhausted"
    assert served == 2


async def test_smart_wallet_sign_ins_that_do_not_hold(
    anvil, facilitator6492, wallet, counterfactual, seller, ledger
):
    base = {
        "seller": seller,
        "facilitator_url": facilitator6492.url,
        "ledger": ledger,
        "public_url": "self",
    }
    stranger = SmartAccount(anvil, new_account())
    stranger.address = wallet.address
    async with paid_stack(**base, free_requests_per_day=5, chain_rpc_url=anvil.rpc_url) as stack:
        # the wallet's owner's own EIP-191 signature is not the wallet's (ERC-7739 binds it)
        header = await signed_in(stack, wallet.owner)
        proof = json.loads(base64.b64decode(header))
        owner_as_wallet = base64.b64encode(
            json.dumps({**proof, "address": wallet.address}).encode()
        ).decode()
        answers = [
            await send_signin(stack, owner_as_wallet),
            await send_signin(stack, await signed_in(stack, stranger)),
            # no factory is listed here: a counterfactual wallet cannot sign in yet
            await send_signin(stack, await signed_in(stack, counterfactual)),
        ]
        served = stack.fake.hits[HITS]
    async with paid_stack(**base, free_requests_per_day=5) as stack:  # no RPC
        no_rpc = await send_signin(stack, await signed_in(stack, wallet))
    assert [status for status, _ in answers] == [402, 402, 402]
    assert {h[wire.ERROR_HEADER] for _, h in answers} == {"invalid_siwx_signature"}
    assert no_rpc[0] == 402
    assert no_rpc[1][wire.ERROR_HEADER] == "invalid_siwx_signature"
    assert served == 0
