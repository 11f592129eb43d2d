"""The dev chain's `upto` contracts are real enough for the official SDK: its upto client signs a
Permit2 witness transfer, its upto facilitator verifies it and settles any amount up to the
signed maximum through our x402UptoPermit2Proxy stand-in, and balances move on chain by exactly
that amount. A replay, an amount above the maximum, a nonce the payer burned and a payer who
never approved Permit2 are all refused, and none of them moves money.
"""

from __future__ import annotations

import httpx
from eth_account import Account
from paygate_dev.chain import registry
from paygate_dev.chain.anvil import PERMIT2_ADDRESS, Anvil
from paygate_dev.chain.facilitator import FacilitatorServer
from web3 import Web3

from tests.fixtures.chain import PAYER_FUNDS, Usdc, facilitator_request, sign_v2_payment

MAXIMUM = 50_000  # 0.05 USDC authorized


def _post(url: str, body: object) -> dict:
    return httpx.post(url, json=body, timeout=20).json()


def _pay(usdc: Usdc, payer, seller: str, facilitator: FacilitatorServer) -> tuple[dict, dict]:
    requirements = usdc.requirements_upto(seller, MAXIMUM, facilitator=facilitator.address)
    return sign_v2_payment(payer, requirements), requirements


def test_supported_names_the_upto_facilitator(facilitator: FacilitatorServer) -> None:
    kinds = httpx.get(f"{facilitator.url}/supported", timeout=10).json()["kinds"]
    upto = [k for k in kinds if k["scheme"] == "upto"]
    assert upto == [
        {
            "x402Version": 2,
            "scheme": "upto",
            "network": "eip155:84532",
            "extra": {"facilitatorAddress": facilitator.address},
        }
    ]


def test_sdk_settles_less_than_the_maximum_once(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, upto_payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, upto_payer, seller, facilitator)
    authorization = payment["payload"]["permit2Authorization"]
    assert authorization["spender"] == "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
    assert authorization["witness"]["facilitator"] == facilitator.address
    verified = _post(f"{facilitator.url}/verify", facilitator_request(payment, requirements))
    assert verified == {"isValid": True, "payer": upto_payer.address}

    actual = {**requirements, "amount": "12345"}
    settled = _post(f"{facilitator.url}/settle", facilitator_request(payment, actual))
    assert settled["success"] is True, settled
    assert settled["amount"] == "12345"
    receipt = anvil.wait_for_receipt(settled["transaction"])
    transfers = [
        log for log in receipt["logs"] if Web3.to_checksum_address(log["address"]) == usdc.address
    ]
    assert len(transfers) == 1
    assert int(transfers[0]["data"].hex(), 16) == 12345
    assert usdc.balance_of(seller) == 12345
    assert usdc.balance_of(upto_payer.address) == PAYER_FUNDS - 12345
    assert usdc.permit2_nonce_used(upto_payer.address, authorization["nonce"])

    replay = _post(f"{facilitator.url}/settle", facilitator_request(payment, actual))
    assert replay["success"] is False
    assert usdc.balance_of(seller) == 12345


def test_more_than_the_maximum_is_refused(
    usdc: Usdc, facilitator: FacilitatorServer, upto_payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, upto_payer, seller, facilitator)
    over = {**requirements, "amount": str(MAXIMUM + 1)}
    answer = _post(f"{facilitator.url}/settle", facilitator_request(payment, over))
    assert answer["success"] is False
    assert answer["errorReason"] == "invalid_upto_evm_payload_settlement_exceeds_amount"
    assert usdc.balance_of(seller) == 0


def test_a_nonce_the_payer_burned_cannot_settle(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, upto_payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, upto_payer, seller, facilitator)
    nonce = int(payment["payload"]["permit2Authorization"]["nonce"])
    permit2 = anvil.w3.eth.contract(address=PERMIT2_ADDRESS, abi=registry.permit2().abi)
    call = permit2.functions.invalidateUnorderedNonces(nonce >> 8, 1 << (nonce & 0xFF))
    tx = call.build_transaction(
        {
            "from": upto_payer.address,
            "nonce": anvil.w3.eth.get_transaction_count(upto_payer.address),
        }
    )
    signed = Account.from_key(upto_payer.key).sign_transaction(tx)
    anvil.wait_for_receipt(anvil.w3.eth.send_raw_transaction(signed.raw_transaction).to_0x_hex())
    assert usdc.permit2_nonce_used(upto_payer.address, nonce)
    answer = _post(
        f"{facilitator.url}/settle",
        facilitator_request(payment, {**requirements, "amount": "100"}),
    )
    assert answer["success"] is False
    assert usdc.balance_of(seller) == 0


def test_without_a_permit2_allowance_verify_says_so(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller, facilitator)
    answer = _post(f"{facilitator.url}/verify", facilitator_request(payment, requirements))
    assert answer["isValid"] is False
    assert answer["invalidReason"] == "permit2_allowance_required"
    assert usdc.chain.allowance(payer.address, PERMIT2_ADDRESS) == 0
