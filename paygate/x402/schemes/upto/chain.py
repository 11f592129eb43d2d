"""``upto`` in chain mode, and its proof of payment in both modes (web3; server-only).

The gateway's gas account (the witness's ``facilitator``) settles Permit2 witness transfers
through the x402UptoPermit2Proxy. Proof of settlement: SETTLED only on a successful receipt
holding the asset's ``Transfer(payer → payTo, amount)`` for the amount settled; a Permit2
nonce used (or burned by the payer) without that transfer is FAILED.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eth_utils import keccak, to_checksum_address
from web3.exceptions import ContractLogicError

from paygate.x402 import smartwallet
from paygate.x402.evm import (
    TRANSFER_TOPIC,
    abi_function,
    abi_tuple,
    address_word,
    hex_of,
    int_of,
    members,
)
from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse
from paygate.x402.schemes.base import invalid, verdict
from paygate.x402.schemes.upto.offer import PERMIT2_ADDRESS, UPTO_PROXY_ADDRESS, payload_of
from paygate.x402.settler import SettlementSubject, SettlementUnknown

if TYPE_CHECKING:
    from paygate.x402.chain_reader import ChainReader
    from paygate.x402.schemes.base import ChainAccess

PROXY_ABI: list[dict[str, Any]] = [
    abi_function(
        "settle",
        [
            abi_tuple(
                "permit",
                [
                    abi_tuple("permitted", members("address token, uint256 amount")),
                    *members("uint256 nonce, uint256 deadline"),
                ],
            ),
            *members("uint256 amount, address owner"),
            abi_tuple("witness", members("address to, address facilitator, uint256 validAfter")),
            *members("bytes signature"),
        ],
    )
]
PERMIT2_ABI: list[dict[str, Any]] = [
    abi_function(
        "nonceBitmap", members("address owner, uint256 word"), ["uint256"], mutability="view"
    )
]
ALLOWANCE_ABI: list[dict[str, Any]] = [
    abi_function(
        "allowance", members("address owner, address spender"), ["uint256"], mutability="view"
    )
]
# The proxy's and Permit2's custom errors → the SDK's reasons (x402 mechanisms/evm/upto).
REVERTS = (
    ("AmountExceedsPermitted", "upto_amount_exceeds_permitted"),
    ("UnauthorizedFacilitator", "upto_unauthorized_facilitator"),
    ("InvalidNonce", "permit2_invalid_nonce"),
    ("SignatureExpired", "permit2_deadline_expired"),
    ("InvalidSignature", "invalid_permit2_signature"),
    ("InvalidSigner", "invalid_permit2_signature"),
    ("PaymentTooEarly", "permit2_payment_too_early"),
    ("exceeds allowance", "permit2_allowance_required"),
    ("exceeds balance", "permit2_insufficient_balance"),
)
TRANSACTION_FAILED = "invalid_upto_evm_transaction_failed"
_ERRORS = (
    "AmountExceedsPermitted()",
    "UnauthorizedFacilitator()",
    "InvalidNonce()",
    "SignatureExpired(uint256)",
    "InvalidSignature()",
    "InvalidSigner()",
    "PaymentTooEarly()",
    "InvalidAmount(uint256)",
    "InvalidAmount()",
)
# web3 reports a custom error as its raw data: the 4-byte selector names it.
_SELECTORS = {"0x" + keccak(text=e)[:4].hex(): e.split("(")[0] for e in _ERRORS}


def settle_args(payment: AnyPaymentPayload, amount: int) -> tuple[Any, ...]:
    """``x402UptoPermit2Proxy.settle``'s arguments for settling ``amount``."""
    payload = payload_of(payment)
    auth = payload.permit2_authorization
    permit = (
        (to_checksum_address(auth.permitted.token), int(auth.permitted.amount)),
        int(auth.nonce),
        int(auth.deadline),
    )
    witness = (
        to_checksum_address(auth.witness.to),
        to_checksum_address(auth.witness.facilitator),
        int(auth.witness.valid_after),
    )
    try:  # a counterfactual wallet's ERC-6492 wrapper is not Permit2's business (as the SDK)
        signature = smartwallet.parse_hex(payload.signature).inner
    except ValueError:
        signature = bytes.fromhex(payload.signature[2:])
    return permit, amount, to_checksum_address(auth.from_), witness, signature


def nonce_position(payment: AnyPaymentPayload) -> tuple[str, int, int]:
    """(owner, word, bit) of the payment's Permit2 nonce in Permit2's bitmap."""
    auth = payload_of(payment).permit2_authorization
    nonce = int(auth.nonce)
    return to_checksum_address(auth.from_), nonce >> 8, nonce & 0xFF


def revert_reason(message: str) -> str:
    """An x402 reason for a revert message (a require string, or a custom error's data)."""
    for selector, name in _SELECTORS.items():
        if selector in message.lower():
            message = name
            break
    return next((reason for text, reason in REVERTS if text in message), TRANSACTION_FAILED)


LOG_WINDOW_BLOCKS = 10_000  # how far back a used nonce's settle transaction is looked for


def settle_call(reader: ChainReader, payment: AnyPaymentPayload, amount: int) -> Any:
    proxy = reader.w3.eth.contract(address=to_checksum_address(UPTO_PROXY_ADDRESS), abi=PROXY_ABI)
    return proxy.functions.settle(*settle_args(payment, amount))


async def simulate(
    reader: ChainReader, payment: AnyPaymentPayload, amount: int, *, sender: str
) -> str | None:
    try:
        await reader.call(settle_call(reader, payment, amount).call, {"from": sender})
    except ContractLogicError as exc:
        return revert_reason(f"{exc} {getattr(exc, 'data', '')}")
    return None


async def nonce_used(reader: ChainReader, payment: AnyPaymentPayload) -> bool:
    owner, word, bit = nonce_position(payment)
    permit2 = reader.w3.eth.contract(address=to_checksum_address(PERMIT2_ADDRESS), abi=PERMIT2_ABI)
    bitmap = await reader.call(permit2.functions.nonceBitmap(owner, word).call)
    return bool(int(bitmap) >> bit & 1)


class UptoChain:
    """`upto` on one chain: verify, settle, and the proof of an outcome."""

    async def verify(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        reader = chain.reader
        auth = payload_of(payment).permit2_authorization
        payer = to_checksum_address(auth.from_)
        maximum = int(auth.permitted.amount)
        await reader.check_chain(requirements)
        token = reader.w3.eth.contract(
            address=to_checksum_address(str(requirements["asset"])), abi=ALLOWANCE_ABI + _BALANCE
        )
        if await reader.call(token.functions.balanceOf(payer).call) < maximum:
            return invalid("permit2_insufficient_balance", payer)
        permit2 = to_checksum_address(PERMIT2_ADDRESS)
        if await reader.call(token.functions.allowance(payer, permit2).call) < maximum:
            return invalid("permit2_allowance_required", payer)
        if await nonce_used(reader, payment):
            return invalid("permit2_invalid_nonce", payer)
        return verdict(await simulate(reader, payment, maximum, sender=chain.address), payer)

    async def settle(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """Settle ``requirements["amount"]`` through the proxy."""
        reader = chain.reader
        await reader.check_chain(requirements)
        amount = int(requirements["amount"])
        reason = await simulate(reader, payment, amount, sender=chain.address)
        if reason == "permit2_invalid_nonce":
            # Used since verify: the chain says by whom.
            return await self.prove(reader, SettlementSubject(payment, requirements))
        if reason is not None:
            payer = to_checksum_address(payload_of(payment).permit2_authorization.from_)
            network = str(requirements["network"])
            return SettleResponse(success=False, error_reason=reason, payer=payer, network=network)
        tx_hash = await chain.send(settle_call(reader, payment, amount))
        return outcome(await chain.mined(tx_hash), tx_hash, payment, requirements)

    async def prove(self, reader: ChainReader, subject: SettlementSubject) -> SettleResponse:
        """The outcome as the chain proves it: SETTLED only with the asset's
        Transfer(payer → payTo, ``requirements["amount"]``) through the proxy (``transaction``'s,
        or the proxy settle of this nonce found in the last blocks); FAILED when the nonce was
        used or burned without it. SettlementUnknown while the nonce is unused."""
        payment, requirements = subject.payment, subject.requirements
        transaction = subject.transaction
        await reader.check_chain(requirements)
        if transaction:
            receipt = await reader.receipt(transaction)
            if receipt is not None:
                settled = outcome(receipt, transaction, payment, requirements)
                if settled.success:
                    return settled
        if not await nonce_used(reader, payment):
            raise SettlementUnknown(
                "the Permit2 nonce is not used on chain yet", transaction=transaction
            )
        found = await _find_settle(reader, payment, requirements)
        if found is not None:
            return outcome(
                found,
                "0x" + bytes(found["transactionHash"]).hex().removeprefix("0x"),
                payment,
                requirements,
            )
        payer = to_checksum_address(payload_of(payment).permit2_authorization.from_)
        return SettleResponse(
            success=False,
            error_reason="permit2_invalid_nonce",
            payer=payer,
            transaction=transaction or "",
            network=str(requirements["network"]),
        )


async def _find_settle(
    reader: ChainReader, payment: AnyPaymentPayload, requirements: dict[str, Any]
) -> Any | None:
    """The receipt of the proxy settle of this payment's nonce, among recent transfers
    payer → payTo (only the witness's facilitator can send one)."""
    w3 = reader.w3
    auth = payload_of(payment).permit2_authorization
    latest = int(await reader.call(lambda: w3.eth.block_number))
    logs = await reader.call(
        w3.eth.get_logs,
        {
            "fromBlock": max(latest - LOG_WINDOW_BLOCKS, 0),
            "toBlock": latest,
            "address": to_checksum_address(str(requirements["asset"])),
            "topics": [
                "0x" + TRANSFER_TOPIC,
                "0x" + address_word(auth.from_),
                "0x" + address_word(str(requirements["payTo"])),
            ],
        },
    )
    nonce = int(auth.nonce)
    proxy = w3.eth.contract(address=to_checksum_address(UPTO_PROXY_ADDRESS), abi=PROXY_ABI)
    for entry in logs:
        tx = await reader.call(w3.eth.get_transaction, entry["transactionHash"])
        if (tx["to"] or "").lower() != UPTO_PROXY_ADDRESS.lower():
            continue
        try:
            _, args = proxy.decode_function_input(tx["input"])
        except ValueError:
            continue
        permit = args["permit"]  # web3 decodes a tuple as a dict of its named components
        found = permit["nonce"] if isinstance(permit, dict) else permit[1]
        if int(found) == nonce:
            return await reader.receipt(tx["hash"])
    return None


def outcome(
    receipt: Any,
    tx_hash: str,
    payment: AnyPaymentPayload,
    requirements: dict[str, Any],
) -> SettleResponse:
    """SETTLED only with the asset's Transfer(payer → payTo) of the amount asked."""
    auth = payload_of(payment).permit2_authorization
    payer = to_checksum_address(auth.from_)
    network = str(requirements["network"])
    token = to_checksum_address(str(requirements["asset"]))
    amount = int(requirements["amount"])
    moved = receipt["status"] == 1 and any(
        to_checksum_address(entry["address"]) == token
        and [hex_of(topic) for topic in entry["topics"][:3]]
        == [TRANSFER_TOPIC, address_word(payer), address_word(str(requirements["payTo"]))]
        and int_of(entry["data"]) == amount
        for entry in receipt["logs"]
    )
    if not moved:
        return SettleResponse(
            success=False,
            error_reason="invalid_transaction_state",
            payer=payer,
            transaction=tx_hash,
            network=network,
        )
    return SettleResponse(
        success=True, payer=payer, transaction=tx_hash, network=network, amount=str(amount)
    )


_BALANCE: list[dict[str, Any]] = [
    abi_function("balanceOf", members("address account"), ["uint256"], mutability="view")
]


ROLE = UptoChain()
