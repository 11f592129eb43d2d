"""``exact``'s transfer on chain and its proof of payment in both modes (web3; server-only):
what the chain role (``chain``) and the batcher (``multicall``) send, simulate and prove.

The gateway's gas account sends the token's ``transferWithAuthorization``; verification reads
the balance and ``authorizationState`` and simulates the transfer with ``eth_call``. A
settlement counts only when one successful receipt holds the asset's
``AuthorizationUsed(payer, nonce)`` *and* ``Transfer(payer → payTo, value)`` logs:
``authorizationState == true`` alone proves nothing, ``cancelAuthorization`` sets it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_utils import keccak, to_checksum_address
from web3.exceptions import ContractLogicError

from paygate.x402 import smartwallet
from paygate.x402.evm import (
    EIP3009_AUTHORIZATION,
    TRANSFER_TOPIC,
    abi_function,
    address_word,
    hex_of,
    int_of,
    members,
)
from paygate.x402.models import AnyPaymentPayload, SettleResponse
from paygate.x402.schemes.exact.verify import NONCE_USED, payload_of
from paygate.x402.settler import ReviewRequired, SettlementSubject, SettlementUnknown

if TYPE_CHECKING:
    from paygate.x402.chain_reader import ChainReader
    from paygate.x402.schemes.base import ChainAccess

# The SDK facilitator's reasons for a counterfactual wallet, so chain mode answers as it would.
FACTORY_NOT_ALLOWED = "eip6492_factory_not_allowed"
DEPLOYMENT_FAILED = "smart_wallet_deployment_failed"
# The token's *WithAuthorization functions take the signed authorization's fields first.
_AUTH_INPUTS = EIP3009_AUTHORIZATION
EIP3009_ABI: list[dict[str, Any]] = [
    abi_function("balanceOf", members("address account"), ["uint256"], mutability="view"),
    abi_function(
        "authorizationState",
        members("address authorizer, bytes32 nonce"),
        ["bool"],
        mutability="view",
    ),
    abi_function(
        "transferWithAuthorization", [*_AUTH_INPUTS, *members("uint8 v, bytes32 r, bytes32 s")]
    ),
    # FiatToken V2.2's overload for contract wallets (ERC-1271) and any other signature
    abi_function("transferWithAuthorization", [*_AUTH_INPUTS, *members("bytes signature")]),
]
_AUTH_ARGS = "address,address,uint256,uint256,uint256,bytes32"
_BY_VRS = f"transferWithAuthorization({_AUTH_ARGS},uint8,bytes32,bytes32)"
_BY_BYTES = f"transferWithAuthorization({_AUTH_ARGS},bytes)"
USED_TOPIC = keccak(text="AuthorizationUsed(address,bytes32)").hex().removeprefix("0x")
CANCELED_TOPIC = keccak(text="AuthorizationCanceled(address,bytes32)").hex().removeprefix("0x")
# The official SDK facilitator's reason for an empty wallet (x402.md's older name is
# "insufficient_funds"): the same answer in chain mode as through a facilitator.
INSUFFICIENT_BALANCE = "invalid_exact_evm_insufficient_balance"
# FiatToken's revert strings → x402 reasons, so callers get the same answer as from a facilitator.
_REVERTS = (
    ("invalid signature", "invalid_exact_evm_payload_signature"),
    ("authorization is used or canceled", NONCE_USED),
    ("authorization is not yet valid", "invalid_exact_evm_payload_authorization_valid_after"),
    ("authorization is expired", "invalid_exact_evm_payload_authorization_valid_before"),
    ("transfer amount exceeds balance", INSUFFICIENT_BALANCE),
)
# Failure reasons of a proof (x402 has none for these).
CANCELED = "authorization_canceled"
USED_WITHOUT_TRANSFER = "authorization_used_without_transfer"
NOT_PROVEN = "invalid_transaction_state"


def revert_reason(message: str) -> str:
    """x402's reason for a FiatToken revert message."""
    message = message.lower()
    return next(
        (reason for text, reason in _REVERTS if text in message),
        "invalid_exact_evm_transaction_simulation_failed",
    )


def token(reader: ChainReader, requirements: dict[str, Any]) -> Any:
    return reader.w3.eth.contract(
        address=to_checksum_address(str(requirements["asset"])), abi=EIP3009_ABI
    )


@dataclass(frozen=True, slots=True)
class TransferFacts:
    """What a receipt must show for one payment."""

    token: str
    payer: str
    pay_to: str
    value: int
    nonce: bytes
    network: str

    @classmethod
    def of(cls, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> TransferFacts:
        auth = payload_of(payment).authorization
        return cls(
            token=to_checksum_address(str(requirements["asset"])),
            payer=to_checksum_address(auth.from_),
            pay_to=to_checksum_address(str(requirements["payTo"])),
            value=int(auth.value),
            nonce=bytes.fromhex(auth.nonce[2:]),
            network=str(requirements["network"]),
        )

    def proven_by(self, receipt: Any) -> bool:
        """One successful receipt with both AuthorizationUsed(payer, nonce) and
        Transfer(payer → payTo, value) logs from the asset contract."""
        if receipt.get("status") != 1:
            return False
        payer, pay_to = address_word(self.payer), address_word(self.pay_to)
        used = moved = False
        for entry in receipt.get("logs") or ():
            if to_checksum_address(entry["address"]) != self.token:
                continue
            topics = [hex_of(topic) for topic in entry["topics"]]
            if topics == [USED_TOPIC, payer, self.nonce.hex()]:
                used = True
            elif topics == [TRANSFER_TOPIC, payer, pay_to] and int_of(entry["data"]) == self.value:
                moved = True
        return used and moved

    def settled(self, transaction: str) -> SettleResponse:
        return SettleResponse(
            success=True,
            payer=self.payer,
            transaction=transaction,
            network=self.network,
            amount=str(self.value),
        )

    def failed(self, reason: str, transaction: str) -> SettleResponse:
        return SettleResponse(
            success=False,
            error_reason=reason,
            payer=self.payer,
            transaction=transaction,
            network=self.network,
        )


async def prove(reader: ChainReader, subject: SettlementSubject) -> SettleResponse:
    """The settlement's outcome as the chain proves it.

    SETTLED only on a receipt holding both logs (``transaction``'s, or the one that used the
    nonce); FAILED when the nonce was cancelled or used without the transfer. Raises
    :class:`SettlementUnknown` while the nonce is unused (nothing happened yet),
    :class:`ReviewRequired` when it is used but its event is out of reach.
    """
    requirements, transaction = subject.requirements, subject.transaction
    await reader.check_chain(requirements)
    facts = TransferFacts.of(subject.payment, requirements)
    if transaction:
        receipt = await reader.receipt(transaction)
        if receipt is not None and facts.proven_by(receipt):
            return facts.settled(transaction)
    used = await reader.call(
        token(reader, requirements).functions.authorizationState(facts.payer, facts.nonce).call
    )
    if not used:
        raise SettlementUnknown(
            "the authorization is not used on chain yet", transaction=transaction
        )
    event = await _nonce_event(reader, facts)
    if event is None:
        raise ReviewRequired(
            f"nonce used, no event within {reader.log_window} blocks", transaction=transaction
        )
    topic, tx_hash = event
    if topic == CANCELED_TOPIC:
        return facts.failed(CANCELED, tx_hash)
    receipt = await reader.receipt(tx_hash)
    if receipt is not None and facts.proven_by(receipt):
        return facts.settled(tx_hash)
    return facts.failed(USED_WITHOUT_TRANSFER, tx_hash)


async def _nonce_event(reader: ChainReader, facts: TransferFacts) -> tuple[str, str] | None:
    """(topic, tx hash) of the AuthorizationUsed/Canceled log of the nonce, newest first."""
    topics = [
        ["0x" + USED_TOPIC, "0x" + CANCELED_TOPIC],
        "0x" + address_word(facts.payer),
        "0x" + facts.nonce.hex(),
    ]
    async for entry in reader.logs_newest_first(facts.token, topics):
        topic = hex_of(entry["topics"][0])
        if topic in (USED_TOPIC, CANCELED_TOPIC):
            return topic, "0x" + hex_of(entry["transactionHash"])
    return None


async def settle_one(
    chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
) -> SettleResponse:
    """Settle ``payment`` in a transaction of its own (deploying its wallet first if needed)."""
    # As verify does: the endpoint must serve the payment's chain (and its id is known before
    # anything is signed: after a restart a settlement may come with no verify first).
    await chain.reader.check_chain(requirements)
    payer = to_checksum_address(payload_of(payment).authorization.from_)
    network = str(requirements["network"])
    reason = await simulate(chain, payment, requirements)
    if reason == NONCE_USED:
        # Used since verify: by a transfer to us (paid) or a cancel (not): the chain says.
        return await prove(chain.reader, SettlementSubject(payment, requirements))
    if reason is not None:
        return SettleResponse(success=False, error_reason=reason, payer=payer, network=network)
    transfer = transfer_call(chain.reader, payment, requirements)
    deployment = await _deployment(chain.reader, payment)
    if deployment is not None:  # simulated just before: an allowed factory
        transfer = _deploy_then(chain.reader, deployment, transfer)
    tx_hash = await chain.send(transfer)
    receipt = await chain.mined(tx_hash)
    facts = TransferFacts.of(payment, requirements)
    if facts.proven_by(receipt):
        return facts.settled(tx_hash)
    # Reverted (or moved nothing): the nonce's own event says why — a cancel mined first?
    try:
        return await prove(chain.reader, SettlementSubject(payment, requirements))
    except SettlementUnknown:
        return facts.failed(NOT_PROVEN, tx_hash)


def transfer_call(
    reader: ChainReader, payment: AnyPaymentPayload, requirements: dict[str, Any]
) -> Any:
    """The token's ``transferWithAuthorization`` for ``payment``: (v, r, s) for an EOA's
    signature, the ``bytes`` overload for a contract wallet's (ERC-6492 wrapper off)."""
    payload = payload_of(payment)
    auth = payload.authorization
    signature = smartwallet.parse_hex(payload.signature)  # ValueError: malformed
    contract = token(reader, requirements)
    args = (
        to_checksum_address(auth.from_),
        to_checksum_address(auth.to),
        int(auth.value),
        int(auth.valid_after),
        int(auth.valid_before),
        bytes.fromhex(auth.nonce[2:]),
    )
    if not signature.is_ecdsa:
        return contract.get_function_by_signature(_BY_BYTES)(*args, signature.inner)
    raw = signature.inner
    v = raw[64] if raw[64] >= 27 else raw[64] + 27
    return contract.get_function_by_signature(_BY_VRS)(*args, v, raw[:32], raw[32:64])


async def _deployment(
    reader: ChainReader, payment: AnyPaymentPayload
) -> smartwallet.WalletDeployment | None:
    """The factory call a counterfactual payer needs first (ERC-6492), or None."""
    payload = payload_of(payment)
    deployment = smartwallet.parse_hex(payload.signature).deployment
    if deployment is None:
        return None
    payer = to_checksum_address(payload.authorization.from_)
    if await reader.call(reader.w3.eth.get_code, payer):
        return None  # deployed since it signed: the wrapper is just unwrapped
    return deployment


def _deploy_then(
    reader: ChainReader,
    deployment: smartwallet.WalletDeployment,
    transfer: Any,
    *,
    diagnose: bool = False,
) -> Any:
    """One Multicall3 call: deploy the wallet, then the transfer. Sent, it is atomic (both
    or none; gas is estimated for both). ``diagnose`` (a simulation): a failed transfer
    does not revert the call, so its revert reason can be read."""
    w3 = reader.w3
    multicall = w3.eth.contract(
        address=to_checksum_address(smartwallet.MULTICALL3_ADDRESS),
        abi=smartwallet.AGGREGATE3_ABI,
    )
    # The same call, as calldata (web3 encodes it by the exact overload's signature).
    data = bytes.fromhex(
        w3.eth.contract(address=transfer.address, abi=EIP3009_ABI)
        .encode_abi(transfer.signature, args=transfer.args)
        .removeprefix("0x")
    )
    return multicall.functions.aggregate3(
        [
            (deployment.factory, False, deployment.calldata),
            (transfer.address, diagnose, data),
        ]
    )


async def simulate(
    chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
) -> str | None:
    reader = chain.reader
    try:
        call = transfer_call(reader, payment, requirements)
    except ValueError:
        return "invalid_exact_evm_payload_signature"
    deployment = await _deployment(reader, payment)
    if deployment is not None:
        return await _simulate_deployed(chain, deployment, call)
    try:
        await reader.call(call.call, {"from": chain.address})
    except ContractLogicError as exc:
        return revert_reason(str(exc))
    return None


async def _simulate_deployed(
    chain: ChainAccess, deployment: smartwallet.WalletDeployment, transfer: Any
) -> str | None:
    """The transfer of a wallet deployed first, in one ``eth_call``."""
    if not smartwallet.allowed(deployment.factory, chain.factories):
        return FACTORY_NOT_ALLOWED
    try:
        results = await chain.reader.call(
            _deploy_then(chain.reader, deployment, transfer, diagnose=True).call,
            {"from": chain.address},
        )
    except ContractLogicError:
        return DEPLOYMENT_FAILED  # the factory call itself failed
    ok, data = results[1]
    return None if ok else revert_reason(smartwallet.revert_text(bytes(data)))
