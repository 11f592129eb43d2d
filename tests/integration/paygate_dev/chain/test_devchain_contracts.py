"""The dev chain's contracts are the real ones where a registry ships them, and the stand-in
behaves like the real one on everything a payment depends on.

- USDC: Circle's FiatToken V2.2 from npm (its build, unmodified) behind its FiatTokenProxy at
  Base Sepolia's USDC address; its EIP-3009 type hashes are the ones paygate and the SDK sign.
- Permit2: Uniswap's source from npm, compiled to the canonical creation code and deployed at
  the canonical address through the deterministic-deployment proxy.
- x402UptoPermit2Proxy (a stand-in: no registry ships it): the witness type the SDK signs, the
  SDK's settle ABI, its events and custom errors, and Permit2's own refusals passed through.
"""

from __future__ import annotations

import time

import pytest
from eth_account.messages import encode_typed_data
from eth_utils import keccak
from paygate_dev.chain import registry
from paygate_dev.chain.accounts import FACILITATOR, PROXY_ADMIN, new_account
from paygate_dev.chain.anvil import Anvil
from paygate_dev.chain.build import load_contract
from paygate_dev.chain.constants import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, USDC_ADDRESS
from web3 import Web3
from web3.exceptions import ContractLogicError
from x402.mechanisms.evm.constants import (
    EIP2612_PERMIT_TYPES,
    UPTO_PERMIT2_WITNESS_TYPES,
    X402_UPTO_PERMIT2_PROXY_ADDRESS,
    X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI,
)
from x402.mechanisms.evm.constants import PERMIT2_ADDRESS as SDK_PERMIT2_ADDRESS

from paygate.x402.schemes.exact import verify as exact_verify
from paygate.x402.schemes.upto import chain as upto_chain
from paygate.x402.schemes.upto import client as upto_client
from tests.fixtures.chain import PAYER_FUNDS, Usdc, sign_v2_payment

MAXIMUM = 50_000


def _struct_type(types: dict, primary: str) -> str:
    """EIP-712 encodeType, from a types table."""
    seen, todo = set(), [primary]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += [m["type"] for m in types[name] if m["type"] in types]

    def one(name: str) -> str:
        return f"{name}(" + ",".join(f"{m['type']} {m['name']}" for m in types[name]) + ")"

    return one(primary) + "".join(one(n) for n in sorted(seen - {primary}))


# -- USDC --------------------------------------------------------------------------------------


def test_usdc_is_circles_fiat_token_v2_2_behind_its_proxy(anvil: Anvil, usdc: Usdc) -> None:
    proxy = anvil.w3.eth.contract(
        address=USDC_ADDRESS, abi=registry.fiat_token_artifacts()["FiatTokenProxy"]["abi"]
    )
    admin = anvil.accounts[PROXY_ADMIN].address
    implementation = proxy.functions.implementation().call({"from": admin})
    artifact = registry.fiat_token_artifacts()["FiatTokenV2_2"]
    code = anvil.w3.eth.get_code(implementation).to_0x_hex()
    # The npm build, unmodified but for the linked SignatureChecker library's address.
    (slots,) = artifact["deployedLinkReferences"]["contracts/util/SignatureChecker.sol"].values()
    offset = slots[0]["start"]
    library = Web3.to_checksum_address("0x" + code[2 + 2 * offset : 2 + 2 * (offset + 20)])
    expected = registry.linked(
        {
            "bytecode": artifact["deployedBytecode"],
            "linkReferences": artifact["deployedLinkReferences"],
        },
        {"SignatureChecker": library},
    )
    assert code == expected
    assert anvil.w3.eth.get_code(library).to_0x_hex() == (
        registry.fiat_token_artifacts()["SignatureChecker"]["deployedBytecode"].replace(
            "0x73" + "00" * 20, "0x73" + library[2:].lower(), 1
        )
    )
    token = anvil.token()
    # A proxy's admin is never served by the token (Zeppelin OS's transparent proxy).
    with pytest.raises(Exception, match="admin"):
        token.functions.balanceOf(admin).call({"from": admin})
    assert token.functions.version().call() == "2"
    assert token.functions.currency().call() == "USD"


def test_usdcs_eip3009_type_hashes_are_what_paygate_and_the_sdk_sign(anvil: Anvil) -> None:
    token = anvil.token()
    ours = _struct_type(exact_verify.TYPES, "TransferWithAuthorization")
    assert bytes(token.functions.TRANSFER_WITH_AUTHORIZATION_TYPEHASH().call()) == keccak(text=ours)
    receive = ours.replace("TransferWithAuthorization", "ReceiveWithAuthorization")
    assert bytes(token.functions.RECEIVE_WITH_AUTHORIZATION_TYPEHASH().call()) == keccak(
        text=receive
    )
    assert bytes(token.functions.PERMIT_TYPEHASH().call()) == keccak(
        text=_struct_type(EIP2612_PERMIT_TYPES, "Permit")
    )


def test_usdc_emits_authorization_used_then_transfer(anvil: Anvil, usdc: Usdc, payer) -> None:
    seller = new_account().address
    payment = sign_v2_payment(payer, usdc.requirements_v2(seller, 1234))
    auth = payment["payload"]["authorization"]
    signature = bytes.fromhex(payment["payload"]["signature"][2:])
    call = anvil.token().get_function_by_signature(
        "transferWithAuthorization(address,address,uint256,uint256,uint256,bytes32,bytes)"
    )(
        auth["from"], auth["to"], int(auth["value"]), int(auth["validAfter"]),
        int(auth["validBefore"]), bytes.fromhex(auth["nonce"][2:]), signature,
    )  # fmt: skip
    receipt = anvil.transact(call)
    topics = [bytes(entry["topics"][0]) for entry in receipt["logs"]]
    assert topics == [
        keccak(text="AuthorizationUsed(address,bytes32)"),
        keccak(text="Transfer(address,address,uint256)"),
    ]
    with pytest.raises(ContractLogicError, match="FiatTokenV2: authorization is used or canceled"):
        anvil.transact(call)


# -- Permit2 -----------------------------------------------------------------------------------


def test_permit2_is_uniswaps_canonical_deployment(anvil: Anvil) -> None:
    contract = registry.permit2()
    assert SDK_PERMIT2_ADDRESS == PERMIT2_ADDRESS
    where = registry.create2_address(
        registry.CREATE2_DEPLOYER, registry.PERMIT2_SALT, contract.bytecode
    )
    assert where == PERMIT2_ADDRESS  # the canonical creation code, byte for byte
    permit2 = anvil.w3.eth.contract(address=PERMIT2_ADDRESS, abi=contract.abi)
    domain = {"name": "Permit2", "chainId": anvil.chain_id, "verifyingContract": PERMIT2_ADDRESS}
    message = encode_typed_data(domain, {"T": [{"name": "x", "type": "uint256"}]}, {"x": 0})
    assert bytes(permit2.functions.DOMAIN_SEPARATOR().call()) == bytes(message.header)


# -- the x402UptoPermit2Proxy stand-in ---------------------------------------------------------


def _proxy(anvil: Anvil):
    return anvil.w3.eth.contract(
        address=UPTO_PROXY_ADDRESS,
        abi=load_contract("X402UptoPermit2Proxy").abi,
    )


def test_the_upto_proxy_stand_in_has_the_sdks_address_witness_and_abi(anvil: Anvil) -> None:
    assert X402_UPTO_PERMIT2_PROXY_ADDRESS == UPTO_PROXY_ADDRESS
    proxy = _proxy(anvil)
    witness = _struct_type(UPTO_PERMIT2_WITNESS_TYPES, "Witness")
    assert bytes(proxy.functions.WITNESS_TYPEHASH().call()) == keccak(text=witness)
    # Permit2 hashes stub + this: the full PermitWitnessTransferFrom type the SDK signs.
    stub = (
        "PermitWitnessTransferFrom(TokenPermissions permitted,address spender,uint256 nonce,"
        "uint256 deadline,"
    )
    full = stub + proxy.functions.WITNESS_TYPE_STRING().call()
    assert full == _struct_type(UPTO_PERMIT2_WITNESS_TYPES, "PermitWitnessTransferFrom")
    assert proxy.functions.PERMIT2().call() == PERMIT2_ADDRESS
    ours = {
        (f["name"], tuple(i["type"] for i in f["inputs"]))
        for f in proxy.abi
        if f["type"] == "function"
    }
    settle = upto_chain.PROXY_ABI[0]
    with_permit = X402_UPTO_PERMIT2_PROXY_SETTLE_WITH_PERMIT_ABI[0]
    for function in (settle, with_permit):
        types = tuple("tuple" if i["type"] == "tuple" else i["type"] for i in function["inputs"])
        assert (function["name"], types) in ours


def _upto_payment(anvil: Anvil, usdc: Usdc, payer, *, facilitator: str, valid_for: int = 300):
    seller = new_account().address
    payload = upto_client.sign(
        payer,
        chain_id=anvil.chain_id,
        token=usdc.address,
        pay_to=seller,
        maximum=MAXIMUM,
        facilitator=facilitator,
        valid_for=valid_for,
    )
    return payload, seller


def _settle_args(payload, amount: int):
    auth = payload.permit2_authorization
    permit = (
        (auth.permitted.token, int(auth.permitted.amount)),
        int(auth.nonce),
        int(auth.deadline),
    )
    witness = (auth.witness.to, auth.witness.facilitator, int(auth.witness.valid_after))
    return permit, amount, auth.from_, witness, bytes.fromhex(payload.signature[2:])


_ERRORS = (
    "InvalidAmount()", "AmountExceedsPermitted()", "UnauthorizedFacilitator()",
    "Permit2612AmountMismatch()", "InvalidNonce()", "SignatureExpired(uint256)",
)  # fmt: skip
_SELECTORS = {"0x" + keccak(text=e)[:4].hex(): e.split("(")[0] for e in _ERRORS}


def _error(call, sender: str) -> str:
    """The custom error ``call`` reverts with (by its selector), or "no revert"."""
    try:
        call.call({"from": sender})
    except Exception as exc:  # web3's ContractLogicError and its custom-error kin
        data = f"{getattr(exc, 'data', '')} {exc}".lower()
        return next((name for sel, name in _SELECTORS.items() if sel in data), data)
    return "no revert"


def test_the_upto_proxy_settles_emits_settled_and_passes_permit2s_refusals_on(
    anvil: Anvil, usdc: Usdc, upto_payer
) -> None:
    facilitator = anvil.accounts[FACILITATOR].address
    payload, seller = _upto_payment(anvil, usdc, upto_payer, facilitator=facilitator)
    proxy = _proxy(anvil)

    def settle(amount: int, payment=payload):
        return proxy.functions.settle(*_settle_args(payment, amount))

    assert _error(settle(0), facilitator) == "InvalidAmount"
    assert _error(settle(MAXIMUM + 1), facilitator) == "AmountExceedsPermitted"
    assert _error(settle(1), seller) == "UnauthorizedFacilitator"  # only the witness's
    receipt = anvil.transact(settle(700), anvil.accounts[FACILITATOR])
    events = [(e["address"], bytes(e["topics"][0])) for e in receipt["logs"]]
    assert events == [
        (USDC_ADDRESS, keccak(text="Transfer(address,address,uint256)")),
        (UPTO_PROXY_ADDRESS, keccak(text="Settled()")),
    ]
    assert usdc.balance_of(seller) == 700
    # Permit2 (the real one) refuses a second use of the nonce, and a deadline gone by.
    assert _error(settle(700), facilitator) == "InvalidNonce"
    late, _ = _upto_payment(anvil, usdc, upto_payer, facilitator=facilitator, valid_for=-60)
    assert _error(settle(700, late), facilitator) == "SignatureExpired"
    # ... which paygate's chain mode names as the SDK does.
    assert [upto_chain.revert_reason(name) for name in ("InvalidNonce", "SignatureExpired")] == [
        "permit2_invalid_nonce",
        "permit2_deadline_expired",
    ]


def test_settle_with_permit_approves_permit2_by_eip2612_first(
    anvil: Anvil, usdc: Usdc, payer
) -> None:
    # No approve transaction from this payer: its EIP-2612 permit does it inside the settle.
    facilitator = anvil.accounts[FACILITATOR]
    assert usdc.chain.allowance(payer.address) == 0
    payload, seller = _upto_payment(anvil, usdc, payer, facilitator=facilitator.address)
    token = anvil.token()
    deadline = int(time.time()) + 300
    signed = payer.sign_typed_data(
        domain_data={
            "name": "USDC",
            "version": "2",
            "chainId": anvil.chain_id,
            "verifyingContract": USDC_ADDRESS,
        },
        message_types=EIP2612_PERMIT_TYPES,
        message_data={
            "owner": payer.address,
            "spender": PERMIT2_ADDRESS,
            "value": MAXIMUM,
            "nonce": token.functions.nonces(payer.address).call(),
            "deadline": deadline,
        },
    )
    permit = (
        MAXIMUM,
        deadline,
        signed.r.to_bytes(32, "big"),
        signed.s.to_bytes(32, "big"),
        signed.v,
    )
    proxy = _proxy(anvil)
    mismatch = (MAXIMUM - 1, *permit[1:])
    call = proxy.functions.settleWithPermit(mismatch, *_settle_args(payload, 500))
    assert _error(call, facilitator.address) == "Permit2612AmountMismatch"
    receipt = anvil.transact(
        proxy.functions.settleWithPermit(permit, *_settle_args(payload, 500)), facilitator
    )
    assert bytes(receipt["logs"][-1]["topics"][0]) == keccak(text="SettledWithPermit()")
    assert usdc.balance_of(seller) == 500
    assert usdc.chain.allowance(payer.address) == MAXIMUM - 500
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - 500
