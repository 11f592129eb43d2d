"""Reading the chain for a payment's proof: EIP-3009's transfer and its nonce events.

:class:`ChainReader` is the proof of payment, for both modes (chain and facilitator): a
settlement counts only when one successful transaction receipt holds the asset's
``AuthorizationUsed(payer, nonce)`` *and* ``Transfer(payer → payTo, value)`` logs.
``authorizationState == true`` alone proves nothing: ``cancelAuthorization`` sets it too, with
no transfer. It is also the bounded, timed RPC access every chain reader shares (``smartwallet``,
``chain_upto``, ``chain``): it imports none of them, so they all point down to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_utils import to_checksum_address
from web3 import Web3
from web3.exceptions import ContractLogicError, TransactionNotFound

from paygate import jsonsafe
from paygate.x402.models import AnyPaymentPayload, SettleResponse
from paygate.x402.networks import resolve_network
from paygate.x402.settler import ReviewRequired, SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")
_T = TypeVar("_T")

_UINT = {"type": "uint256"}
EIP3009_ABI: list[dict[str, Any]] = [
    {
        "name": "balanceOf",
        "type": "function",
        "stateMutability": "view",
        "inputs": [{"name": "account", "type": "address"}],
        "outputs": [{"name": "", **_UINT}],
    },
    {
        "name": "authorizationState",
        "type": "function",
        "stateMutability": "view",
        "inputs": [
            {"name": "authorizer", "type": "address"},
            {"name": "nonce", "type": "bytes32"},
        ],
        "outputs": [{"name": "", "type": "bool"}],
    },
    {
        "name": "transferWithAuthorization",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", **_UINT},
            {"name": "validAfter", **_UINT},
            {"name": "validBefore", **_UINT},
            {"name": "nonce", "type": "bytes32"},
            {"name": "v", "type": "uint8"},
            {"name": "r", "type": "bytes32"},
            {"name": "s", "type": "bytes32"},
        ],
        "outputs": [],
    },
    {  # FiatToken V2.2's overload for contract wallets (ERC-1271) and any other signature
        "name": "transferWithAuthorization",
        "type": "function",
        "stateMutability": "nonpayable",
        "inputs": [
            {"name": "from", "type": "address"},
            {"name": "to", "type": "address"},
            {"name": "value", **_UINT},
            {"name": "validAfter", **_UINT},
            {"name": "validBefore", **_UINT},
            {"name": "nonce", "type": "bytes32"},
            {"name": "signature", "type": "bytes"},
        ],
        "outputs": [],
    },
]
TRANSFER_TOPIC = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"
USED_TOPIC = Web3.keccak(text="AuthorizationUsed(address,bytes32)").hex().removeprefix("0x")
CANCELED_TOPIC = Web3.keccak(text="AuthorizationCanceled(address,bytes32)").hex().removeprefix("0x")
# How far back eth_getLogs looks for a nonce's event, in chunks hosted RPCs accept.
LOG_WINDOW_BLOCKS = 50_000
LOG_CHUNK_BLOCKS = 5_000
# Failure reasons of reconcile (x402 has none for these).
CANCELED = "authorization_canceled"
USED_WITHOUT_TRANSFER = "authorization_used_without_transfer"
NOT_PROVEN = "invalid_transaction_state"


class ChainReader:
    """Reads the chain behind ``rpc_url``: the proof (or disproof) of one payment."""

    def __init__(
        self,
        rpc_url: str,
        *,
        timeout: float,
        log_window: int = LOG_WINDOW_BLOCKS,
        log_chunk: int = LOG_CHUNK_BLOCKS,
    ) -> None:
        self.w3 = Web3(BoundedHTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self._timeout = timeout
        self._log_window = log_window
        self._log_chunk = log_chunk
        self.chain_id: int | None = None

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self._timeout)
        except (TimeoutError, OSError) as exc:
            log.warning("chain call failed: %s", type(exc).__name__)
            raise SettlerUnavailable("the chain's RPC endpoint is unavailable") from None
        except (ContractLogicError, TransactionNotFound):
            raise  # answers from the chain, not a failure to reach it
        except Exception as exc:  # requests', web3's and the JSON bound's errors: many classes
            log.warning("chain call failed: %s", type(exc).__name__)
            raise SettlerUnavailable("the chain's RPC endpoint is unavailable") from None

    async def check_chain(self, requirements: dict[str, Any]) -> None:
        """The endpoint must serve the payment's chain: another chain's state proves nothing."""
        if self.chain_id is None:
            self.chain_id = int(await self.call(lambda: self.w3.eth.chain_id))
        if resolve_network(str(requirements["network"])).chain_id != self.chain_id:
            raise SettlerUnavailable("the RPC endpoint serves another chain")

    def token(self, requirements: dict[str, Any]) -> Any:
        return self.w3.eth.contract(
            address=to_checksum_address(str(requirements["asset"])), abi=EIP3009_ABI
        )

    async def receipt(self, transaction: str) -> Any | None:
        try:
            return await self.call(self.w3.eth.get_transaction_receipt, transaction)
        except TransactionNotFound:
            return None

    async def known(self, transaction: str) -> bool:
        """Does the node know the transaction at all (mined or waiting in its mempool)?"""
        try:
            return await self.call(self.w3.eth.get_transaction, transaction) is not None
        except TransactionNotFound:
            return False

    async def prove(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any], transaction: str | None
    ) -> SettleResponse:
        """The settlement's outcome as the chain proves it.

        SETTLED only on a receipt holding both logs (``transaction``'s, or the one that used the
        nonce); FAILED when the nonce was cancelled or used without the transfer. Raises
        :class:`SettlementUnknown` while the nonce is unused (nothing happened yet),
        :class:`ReviewRequired` when it is used but its event is out of reach.
        """
        await self.check_chain(requirements)
        facts = TransferFacts.of(payment, requirements)
        if transaction:
            receipt = await self.receipt(transaction)
            if receipt is not None and facts.proven_by(receipt):
                return facts.settled(transaction)
        used = await self.call(
            self.token(requirements).functions.authorizationState(facts.payer, facts.nonce).call
        )
        if not used:
            raise SettlementUnknown(
                "the authorization is not used on chain yet", transaction=transaction
            )
        event = await self._nonce_event(facts)
        if event is None:
            raise ReviewRequired(
                f"nonce used, no event within {self._log_window} blocks", transaction=transaction
            )
        topic, tx_hash = event
        if topic == CANCELED_TOPIC:
            return facts.failed(CANCELED, tx_hash)
        receipt = await self.receipt(tx_hash)
        if receipt is not None and facts.proven_by(receipt):
            return facts.settled(tx_hash)
        return facts.failed(USED_WITHOUT_TRANSFER, tx_hash)

    async def _nonce_event(self, facts: TransferFacts) -> tuple[str, str] | None:
        """(topic, tx hash) of the AuthorizationUsed/Canceled log of the nonce, newest first."""
        latest = int(await self.call(lambda: self.w3.eth.block_number))
        oldest = max(0, latest - self._log_window)
        high = latest
        while high >= oldest:
            low = max(oldest, high - self._log_chunk + 1)
            logs = await self.call(
                self.w3.eth.get_logs,
                {
                    "address": facts.token,
                    "fromBlock": low,
                    "toBlock": high,
                    "topics": [
                        ["0x" + USED_TOPIC, "0x" + CANCELED_TOPIC],
                        "0x" + word(bytes.fromhex(facts.payer[2:])),
                        "0x" + facts.nonce.hex(),
                    ],
                },
            )
            for entry in reversed(list(logs)):
                topic = hex_of(entry["topics"][0])
                if topic in (USED_TOPIC, CANCELED_TOPIC):
                    return topic, "0x" + hex_of(entry["transactionHash"])
            high = low - 1
        return None


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
        auth = payment.payload.authorization
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
        payer = word(bytes.fromhex(self.payer[2:]))
        pay_to = word(bytes.fromhex(self.pay_to[2:]))
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


class BoundedHTTPProvider(Web3.HTTPProvider):
    """web3's HTTP provider with the RPC's answers parsed under paygate's JSON bounds."""

    def decode_rpc_response(self, raw_response: bytes) -> Any:
        return jsonsafe.loads(raw_response, max_bytes=MAX_RPC_ANSWER_BYTES)


MAX_RPC_ANSWER_BYTES = 16 * 1024 * 1024  # a block range's logs can be large


def hex_of(value: Any) -> str:
    if isinstance(value, str):
        return value.lower().removeprefix("0x")
    return bytes(value).hex()


def word(raw: bytes) -> str:
    return raw.rjust(32, b"\0").hex()


def int_of(value: Any) -> int:
    return int(hex_of(value) or "0", 16)
