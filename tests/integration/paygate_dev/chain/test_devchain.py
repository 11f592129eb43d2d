"""The dev chain is real: anvil, Circle's FiatToken (npm), and the official x402 SDK on both ends.

The SDK's paying client signs, our HTTP facilitator (the SDK's facilitator behind aiohttp)
verifies and settles on anvil, and balances move on-chain by exactly the amount paid. Every
fault mode the gateway tests rely on is exercised here against the same server.
"""

from __future__ import annotations

import copy
import threading
import time

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from paygate_dev.chain.accounts import FACILITATOR, GATEWAY_GAS, SPARE, DevAccount, dev_accounts
from paygate_dev.chain.anvil import MULTICALL3_ADDRESS, USDC_ADDRESS, Anvil
from paygate_dev.chain.build import ARTIFACT, compile_contracts, load_contract, render
from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings
from paygate_dev.chain.facilitator_process import FacilitatorProcess
from paygate_dev.stack import ComponentMissing
from x402 import x402Client
from x402.http import FacilitatorConfig, HTTPFacilitatorClient
from x402.mechanisms.evm import EthAccountSigner, FacilitatorWeb3Signer
from x402.mechanisms.evm.constants import (
    ERR_INSUFFICIENT_BALANCE,
    ERR_INVALID_SIGNATURE,
    ERR_NONCE_ALREADY_USED,
    ERR_SETTLEMENT_PENDING,
    ERR_TRANSACTION_SIMULATION_FAILED,
)
from x402.mechanisms.evm.exact import register_exact_evm_client
from x402.mechanisms.evm.exact.eip3009_utils import diagnose_eip3009_simulation_failure
from x402.mechanisms.evm.types import ExactEIP3009Payload
from x402.schemas import PaymentRequired, parse_payment_payload, parse_payment_requirements

from tests.fixtures.chain import (
    PAYER_FUNDS,
    Usdc,
    facilitator_request,
    sign_v1_payment,
    sign_v2_payment,
)

AMOUNT = 10_000  # 0.01 USDC


def _post(url: str, body: object, timeout: float = 10.0) -> httpx.Response:
    return httpx.post(url, json=body, timeout=timeout)


def _pay(usdc: Usdc, payer, seller: str, amount: int = AMOUNT) -> tuple[dict, dict]:
    requirements = usdc.requirements_v2(seller, amount)
    return sign_v2_payment(payer, requirements), requirements


# -- the artifact and the chain --------------------------------------------------------------


def test_checked_in_artifact_matches_a_fresh_solc_build() -> None:
    fresh = render(compile_contracts())
    assert ARTIFACT.read_text() == fresh, (
        "run `bash scripts/build_contracts.sh` and commit build.json"
    )


def test_dev_accounts_are_anvils_funded_accounts(anvil: Anvil) -> None:
    assert [a.address for a in dev_accounts()] == anvil.w3.eth.accounts
    assert len({FACILITATOR, GATEWAY_GAS}) == 2
    assert anvil.accounts[FACILITATOR].key not in repr(anvil.accounts[FACILITATOR])


def test_usdc_has_base_sepolias_domain_at_its_own_address(anvil: Anvil, usdc: Usdc) -> None:
    token = anvil.token()
    assert anvil.w3.eth.chain_id == 84532
    assert (token.functions.name().call(), token.functions.version().call()) == ("USDC", "2")
    assert token.functions.decimals().call() == 6

    def separator(address: str) -> bytes:
        domain = {"name": "USDC", "version": "2", "chainId": 84532, "verifyingContract": address}
        message = encode_typed_data(domain, {"T": [{"name": "x", "type": "uint256"}]}, {"x": 0})
        return bytes(message.header)

    # The proxy was moved to the USDC address: the separator must follow it (V2.2 computes it
    # per call), and another token of the same name elsewhere signs under another domain.
    assert bytes(token.functions.DOMAIN_SEPARATOR().call()) == separator(USDC_ADDRESS)
    other = anvil.deploy_fiat_token("USDC", "USDC")
    assert bytes(anvil.token(other).functions.DOMAIN_SEPARATOR().call()) == separator(other)
    assert anvil.w3.eth.get_code(MULTICALL3_ADDRESS).to_0x_hex() == (
        load_contract("Multicall3").deployed_bytecode
    )


def test_missing_anvil_fails_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("PAYGATE_CHAIN_TOOLS", str(tmp_path / "node_modules"))
    with pytest.raises(ComponentMissing, match=r"scripts/setup\.sh"):
        Anvil()


# -- paying with the SDK's own client -------------------------------------------------------


async def test_sdk_client_payment_verifies_settles_and_cannot_be_replayed(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    client = x402Client()
    register_exact_evm_client(client, EthAccountSigner(Account.from_key(payer.key)))
    requirements = usdc.requirements_v2(seller, AMOUNT)
    required = PaymentRequired.model_validate(
        {"x402Version": 2, "resource": {"url": "http://127.0.0.1/x"}, "accepts": [requirements]}
    )
    payment = (await client.create_payment_payload(required)).model_dump(
        mode="json", by_alias=True, exclude_none=True
    )
    body = facilitator_request(payment, requirements)
    nonce = payment["payload"]["authorization"]["nonce"]

    async with httpx.AsyncClient(timeout=10) as http:
        verified = (await http.post(f"{facilitator.url}/verify", json=body)).json()
        assert verified == {"isValid": True, "payer": payer.address}

        settled = (await http.post(f"{facilitator.url}/settle", json=body)).json()
        assert settled["success"] is True, settled
        assert settled["network"] == "eip155:84532"
        receipt = anvil.wait_for_receipt(settled["transaction"])
        assert receipt["status"] == 1
        assert usdc.balance_of(seller) == AMOUNT
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - AMOUNT
        assert usdc.authorization_state(payer.address, nonce) is True

        replay = (await http.post(f"{facilitator.url}/settle", json=body)).json()
        assert replay["success"] is False
        assert (
            replay["errorReason"]
            == ERR_NONCE_ALREADY_USED
            == "invalid_exact_evm_nonce_already_used"
        )
        assert replay["transaction"] == ""
        again = (await http.post(f"{facilitator.url}/verify", json=body)).json()
        assert again["invalidReason"] == ERR_NONCE_ALREADY_USED
    assert usdc.balance_of(seller) == AMOUNT
    assert facilitator.stats.verify_calls == 2
    assert facilitator.stats.settle_calls == 2
    assert facilitator.stats.transactions == [settled["transaction"]]


async def test_sdk_http_facilitator_client_speaks_to_it(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    payload = parse_payment_payload(payment)
    parsed_requirements = parse_payment_requirements(2, requirements)
    async with HTTPFacilitatorClient(FacilitatorConfig(url=facilitator.url)) as sdk:
        supported = sdk.get_supported()
        kinds = {(k.x402_version, k.network) for k in supported.kinds}
        assert {(2, "eip155:84532"), (1, "base-sepolia")} <= kinds
        assert supported.signers["eip155:*"] == [facilitator.address]
        assert (await sdk.verify(payload, parsed_requirements)).is_valid
        result = await sdk.settle(payload, parsed_requirements)
    assert result.success
    assert usdc.balance_of(seller) == AMOUNT


def test_v1_payment_from_the_sdk_v1_client(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    requirements = usdc.requirements_v1(seller, AMOUNT)
    payment = sign_v1_payment(payer, requirements)
    assert payment["x402Version"] == 1
    assert (payment["scheme"], payment["network"]) == ("exact", "base-sepolia")
    body = facilitator_request(payment, requirements)
    assert _post(f"{facilitator.url}/verify", body).json()["isValid"] is True
    settled = _post(f"{facilitator.url}/settle", body).json()
    assert settled["success"] is True
    assert settled["network"] == "base-sepolia"
    assert usdc.balance_of(seller) == AMOUNT


def test_tampered_signature_is_invalid_and_moves_nothing(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    tampered = copy.deepcopy(payment)
    signature = tampered["payload"]["signature"]
    tampered["payload"]["signature"] = (
        signature[:10] + ("0" if signature[10] != "0" else "1") + signature[11:]
    )
    body = facilitator_request(tampered, requirements)
    verified = _post(f"{facilitator.url}/verify", body).json()
    assert verified["isValid"] is False
    assert verified["invalidReason"] == ERR_INVALID_SIGNATURE
    settled = _post(f"{facilitator.url}/settle", body).json()
    assert settled["success"] is False
    assert settled["transaction"] == ""
    assert usdc.balance_of(seller) == 0
    assert usdc.balance_of(payer.address) == PAYER_FUNDS


def test_unfunded_payer_is_refused_for_insufficient_balance(
    usdc: Usdc, facilitator: FacilitatorServer, seller: str
) -> None:
    broke = Account.create()
    payment, requirements = _pay(usdc, broke, seller)
    verified = _post(f"{facilitator.url}/verify", facilitator_request(payment, requirements)).json()
    assert verified["invalidReason"] == ERR_INSUFFICIENT_BALANCE


def test_multicall_stand_in_lets_the_sdk_explain_a_used_nonce(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    # The SDK's fallback diagnosis batches balance/name/version/authorizationState through
    # Multicall3.tryAggregate; without the stand-in it can only say "simulation failed".
    payment, requirements = _pay(usdc, payer, seller)
    assert _post(f"{facilitator.url}/settle", facilitator_request(payment, requirements)).json()[
        "success"
    ]
    signer = FacilitatorWeb3Signer(
        private_key=anvil.accounts[GATEWAY_GAS].key, rpc_url=anvil.rpc_url
    )
    authorization = ExactEIP3009Payload.from_dict(payment["payload"]).authorization

    def diagnose() -> str:
        return diagnose_eip3009_simulation_failure(
            signer, USDC_ADDRESS, authorization, AMOUNT, "USDC", "2"
        )

    assert diagnose() == ERR_NONCE_ALREADY_USED
    anvil.set_code(MULTICALL3_ADDRESS, "0x")
    try:
        assert diagnose() == ERR_TRANSACTION_SIMULATION_FAILED
    finally:
        anvil.set_code(MULTICALL3_ADDRESS, load_contract("Multicall3").deployed_bytecode)


# -- fault modes -----------------------------------------------------------------------------


def test_http_500_answers_without_touching_the_chain(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    facilitator.set_fault("http_500")
    for endpoint in ("verify", "settle"):
        response = _post(
            f"{facilitator.url}/{endpoint}", facilitator_request(payment, requirements)
        )
        assert response.status_code == 500
    assert (facilitator.stats.verify_calls, facilitator.stats.settle_calls) == (1, 1)
    assert usdc.balance_of(seller) == 0
    assert facilitator.stats.transactions == []


def test_garbage_is_a_200_that_is_not_json(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    facilitator.set_fault("garbage", "verify")
    response = _post(f"{facilitator.url}/verify", facilitator_request(payment, requirements))
    assert response.status_code == 200
    with pytest.raises(ValueError):  # noqa: PT011 - json's error type is ValueError
        response.json()


def test_slow_delays_then_answers(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    body = facilitator_request(payment, requirements)
    facilitator.set_fault("slow", "verify", delay=0.6)
    with pytest.raises(httpx.ReadTimeout):
        _post(f"{facilitator.url}/verify", body, timeout=0.2)
    started = time.monotonic()
    assert _post(f"{facilitator.url}/verify", body).json()["isValid"] is True
    assert time.monotonic() - started >= 0.6


def test_down_refuses_connections_until_reset(facilitator: FacilitatorServer) -> None:
    facilitator.set_fault("down")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{facilitator.url}/supported", timeout=2)
    assert facilitator.stats.calls("supported") == 0  # never reached the facilitator
    facilitator.reset()
    assert httpx.get(f"{facilitator.url}/supported", timeout=5).status_code == 200


def test_settlement_pending_settles_but_answers_pending(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    facilitator.set_fault("settlement_pending")
    answer = _post(f"{facilitator.url}/settle", facilitator_request(payment, requirements)).json()
    assert answer["success"] is False
    assert answer["errorReason"] == ERR_SETTLEMENT_PENDING == "settlement_pending"
    assert anvil.wait_for_receipt(answer["transaction"])["status"] == 1
    assert usdc.balance_of(seller) == AMOUNT


def test_hold_settle_never_answers_and_never_settles(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    facilitator.set_fault("hold_settle")
    with pytest.raises(httpx.ReadTimeout):
        _post(f"{facilitator.url}/settle", facilitator_request(payment, requirements), timeout=0.5)
    assert facilitator.stats.held == 1
    assert facilitator.stats.settle_calls == 1
    nonce = payment["payload"]["authorization"]["nonce"]
    assert usdc.authorization_state(payer.address, nonce) is False
    assert usdc.balance_of(seller) == 0


def test_hold_settle_release_hangs_up_on_the_client(
    usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    facilitator.set_fault("hold_settle")
    with httpx.Client(timeout=10) as http:
        errors: list[BaseException] = []

        def call() -> None:
            try:
                http.post(
                    f"{facilitator.url}/settle", json=facilitator_request(payment, requirements)
                )
            except httpx.HTTPError as exc:
                errors.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        facilitator.stats.wait_for("settle", 1, timeout=5)
        facilitator.release_held()
        worker.join(5)
    assert not worker.is_alive()
    assert len(errors) == 1
    assert isinstance(errors[0], httpx.RemoteProtocolError | httpx.ReadError)


def test_settle_then_hang_moves_money_but_never_answers(
    anvil: Anvil, usdc: Usdc, facilitator: FacilitatorServer, payer, seller: str
) -> None:
    payment, requirements = _pay(usdc, payer, seller)
    facilitator.set_fault("settle_then_hang")
    with pytest.raises(httpx.ReadTimeout):
        _post(f"{facilitator.url}/settle", facilitator_request(payment, requirements), timeout=1.5)
    assert usdc.balance_of(seller) == AMOUNT
    (tx_hash,) = facilitator.stats.transactions
    assert anvil.wait_for_receipt(tx_hash)["status"] == 1


def test_the_sdk_itself_answers_settlement_pending_and_reconciles_the_retry(
    anvil: Anvil, usdc: Usdc, payer, seller: str
) -> None:
    # No injected fault: mining is paused, so the SDK's receipt wait times out after broadcast.
    settings = FacilitatorSettings(
        rpc_url=anvil.rpc_url,
        private_key=anvil.accounts[SPARE].key,
        confirmation_timeout=0.5,
    )
    payment, requirements = _pay(usdc, payer, seller)
    body = facilitator_request(payment, requirements)
    with FacilitatorServer(settings) as server:
        anvil.set_automine(False)
        try:
            pending = _post(f"{server.url}/settle", body).json()
            assert pending["success"] is False
            assert pending["errorReason"] == "settlement_pending"
            assert pending["transaction"].startswith("0x")
            assert usdc.balance_of(seller) == 0  # broadcast, not mined
            anvil.mine()
        finally:
            anvil.set_automine(True)
        # The same payload again: the SDK reconciles against the broadcast hash, no second send.
        retried = _post(f"{server.url}/settle", body).json()
    assert retried["success"] is True
    assert retried["transaction"] == pending["transaction"]
    assert usdc.balance_of(seller) == AMOUNT


def test_bad_request_bodies_are_400(facilitator: FacilitatorServer) -> None:
    assert httpx.post(f"{facilitator.url}/verify", content=b"{", timeout=5).status_code == 400
    assert _post(f"{facilitator.url}/settle", {"x402Version": 2}).status_code == 400
    assert facilitator.stats.verify_calls == 1  # it did reach the facilitator


def test_facilitator_as_a_process_can_be_faulted_and_killed(
    usdc: Usdc, facilitator_process: FacilitatorProcess, payer, seller: str
) -> None:
    assert facilitator_process.address == dev_accounts()[FACILITATOR].address
    payment, requirements = _pay(usdc, payer, seller)
    body = facilitator_request(payment, requirements)
    facilitator_process.set_fault("http_500", "verify")
    assert _post(f"{facilitator_process.url}/verify", body).status_code == 500
    facilitator_process.reset()
    assert _post(f"{facilitator_process.url}/verify", body).json()["isValid"] is True
    assert facilitator_process.calls("verify") == 1
    facilitator_process.kill()
    with pytest.raises(httpx.ConnectError):
        _post(f"{facilitator_process.url}/settle", body)
    facilitator_process.start()
    assert _post(f"{facilitator_process.url}/settle", body).json()["success"] is True
    assert usdc.balance_of(seller) == AMOUNT
    log = facilitator_process.log_path.read_text()
    assert dev_accounts()[FACILITATOR].key.removeprefix("0x") not in log


def test_secrets_stay_out_of_reprs(anvil: Anvil, facilitator: FacilitatorServer) -> None:
    key = anvil.accounts[FACILITATOR].key
    assert key not in repr(facilitator.settings)
    assert key not in repr(facilitator)
    assert key not in repr(anvil.accounts[FACILITATOR])
    assert isinstance(anvil.accounts[FACILITATOR], DevAccount)
