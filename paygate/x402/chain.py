"""Chain mode: verify and settle EIP-3009 payments directly on chain, with no third party.

The gateway's own gas key sends ``transferWithAuthorization``; verification reads the balance
and ``authorizationState`` and simulates the transfer with ``eth_call``. web3 is synchronous,
so every call runs in a worker thread under a time-out; sends are serialised so that the gas
account's transaction nonces never collide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from eth_account import Account
from eth_utils import to_checksum_address
from pydantic import SecretStr
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound

from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse
from paygate.x402.networks import resolve_network
from paygate.x402.settler import NONCE_USED, SettlementUnknown, SettlerUnavailable

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
]
# keccak256("Transfer(address,address,uint256)")
TRANSFER_TOPIC = "ddf252ad1be2c89b69c2b068fc378daa952ba7f163c4a11628f55a4df523b3ef"

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


class ChainSettler:
    """Verify and settle on the chain behind ``rpc_url`` with the gas account of ``gas_key``."""

    def __init__(
        self, rpc_url: str, gas_key: SecretStr, *, timeout: float, settle_timeout: float
    ) -> None:
        self._w3 = Web3(Web3.HTTPProvider(rpc_url, request_kwargs={"timeout": timeout}))
        self._account = Account.from_key(gas_key.get_secret_value())
        self._timeout = timeout
        self._settle_timeout = settle_timeout
        self._send_lock = asyncio.Lock()
        self._chain_id: int | None = None

    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        auth = payment.payload.authorization
        payer = to_checksum_address(auth.from_)
        await self._check_chain(requirements)
        token = self._token(requirements)
        nonce = bytes.fromhex(auth.nonce[2:])
        balance = await self._call(token.functions.balanceOf(payer).call)
        if balance < int(auth.value):
            return _invalid(INSUFFICIENT_BALANCE, payer)
        if await self._call(token.functions.authorizationState(payer, nonce).call):
            return _invalid(NONCE_USED, payer)
        reason = await self._simulate(payment, requirements)
        if reason is not None:
            return _invalid(reason, payer)
        return VerifyResponse(is_valid=True, payer=payer)

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        payer = to_checksum_address(payment.payload.authorization.from_)
        network = str(requirements["network"])
        reason = await self._simulate(payment, requirements)
        if reason is not None:
            return SettleResponse(success=False, error_reason=reason, payer=payer, network=network)
        async with self._send_lock:
            tx_hash = await self._send(payment, requirements)
        return await self._await_receipt(tx_hash, payment, requirements)

    async def reconcile(
        self,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
        transaction: str | None,
    ) -> SettleResponse:
        if transaction:
            try:
                receipt = await self._call(self._w3.eth.get_transaction_receipt, transaction)
            except TransactionNotFound:
                receipt = None
            if receipt is not None:
                return self._outcome(receipt, transaction, payment, requirements)
        auth = payment.payload.authorization
        token = self._token(requirements)
        used = await self._call(
            token.functions.authorizationState(
                to_checksum_address(auth.from_), bytes.fromhex(auth.nonce[2:])
            ).call
        )
        if used:
            # Spent by our earlier send (or by anyone: ``to`` is us, so the money arrived).
            return SettleResponse(
                success=True,
                payer=to_checksum_address(auth.from_),
                transaction=transaction or "",
                network=str(requirements["network"]),
                amount=auth.value,
            )
        if transaction:
            raise SettlementUnknown("the transaction is not mined yet", transaction=transaction)
        return await self.settle(payment, requirements)

    async def close(self) -> None:
        return None

    # --- internals ---

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await asyncio.wait_for(asyncio.to_thread(fn, *args), self._timeout)
        except (TimeoutError, OSError) as exc:
            log.warning("chain call failed: %s", type(exc).__name__)
            raise SettlerUnavailable("the chain's RPC endpoint is unavailable") from None
        except (ContractLogicError, ValueError, TransactionNotFound):
            raise  # answers from the chain, not a failure to reach it
        except Exception as exc:  # requests' and web3's connection errors have many classes
            log.warning("chain call failed: %s", type(exc).__name__)
            raise SettlerUnavailable("the chain's RPC endpoint is unavailable") from None

    async def _check_chain(self, requirements: dict[str, Any]) -> None:
        if self._chain_id is None:
            self._chain_id = int(await self._call(lambda: self._w3.eth.chain_id))
        if resolve_network(str(requirements["network"])).chain_id != self._chain_id:
            raise SettlerUnavailable("the RPC endpoint serves another chain")

    def _token(self, requirements: dict[str, Any]) -> Any:
        return self._w3.eth.contract(
            address=to_checksum_address(str(requirements["asset"])), abi=EIP3009_ABI
        )

    def _transfer(self, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> Any:
        auth = payment.payload.authorization
        signature = bytes.fromhex(payment.payload.signature[2:])
        if len(signature) != 65:
            raise ValueError("chain mode settles 65-byte ECDSA signatures only")
        v = signature[64] if signature[64] >= 27 else signature[64] + 27
        return self._token(requirements).functions.transferWithAuthorization(
            to_checksum_address(auth.from_),
            to_checksum_address(auth.to),
            int(auth.value),
            int(auth.valid_after),
            int(auth.valid_before),
            bytes.fromhex(auth.nonce[2:]),
            v,
            signature[:32],
            signature[32:64],
        )

    async def _simulate(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> str | None:
        try:
            call = self._transfer(payment, requirements)
        except ValueError:
            return "invalid_exact_evm_payload_signature"
        try:
            await self._call(call.call, {"from": self._account.address})
        except ContractLogicError as exc:
            message = str(exc).lower()
            return next(
                (reason for text, reason in _REVERTS if text in message),
                "invalid_exact_evm_transaction_simulation_failed",
            )
        return None

    async def _send(self, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> str:
        call = self._transfer(payment, requirements)
        sender = self._account.address
        nonce = await self._call(self._w3.eth.get_transaction_count, sender, "pending")
        tx = await self._call(
            call.build_transaction,
            {"from": sender, "nonce": nonce, "chainId": self._chain_id or 0},
        )
        signed = self._account.sign_transaction(tx)
        tx_hash = "0x" + bytes(signed.hash).hex()
        try:
            await self._call(self._w3.eth.send_raw_transaction, signed.raw_transaction)
        except SettlerUnavailable:
            # The node may or may not have it: the hash is known, so reconcile by it.
            raise SettlementUnknown(
                "the transaction may not have been sent", transaction=tx_hash
            ) from None
        return tx_hash

    async def _await_receipt(
        self, tx_hash: str, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        try:
            receipt = await asyncio.wait_for(
                asyncio.to_thread(
                    self._w3.eth.wait_for_transaction_receipt,
                    tx_hash,
                    self._settle_timeout,
                    0.1,
                ),
                self._settle_timeout + self._timeout,
            )
        except (TimeoutError, TimeExhausted):
            raise SettlementUnknown("no receipt yet", transaction=tx_hash) from None
        except Exception as exc:
            log.warning("waiting for a receipt failed: %s", type(exc).__name__)
            raise SettlementUnknown("no receipt yet", transaction=tx_hash) from None
        return self._outcome(receipt, tx_hash, payment, requirements)

    def _outcome(
        self,
        receipt: Any,
        tx_hash: str,
        payment: AnyPaymentPayload,
        requirements: dict[str, Any],
    ) -> SettleResponse:
        auth = payment.payload.authorization
        payer = to_checksum_address(auth.from_)
        network = str(requirements["network"])
        token = to_checksum_address(str(requirements["asset"]))
        moved = receipt["status"] == 1 and any(
            to_checksum_address(entry["address"]) == token
            and bytes(entry["topics"][0]).hex().removeprefix("0x") == TRANSFER_TOPIC
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
            success=True, payer=payer, transaction=tx_hash, network=network, amount=auth.value
        )


def _invalid(reason: str, payer: str) -> VerifyResponse:
    return VerifyResponse(is_valid=False, invalid_reason=reason, payer=payer)
