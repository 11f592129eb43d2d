"""Chain mode: verify and settle EIP-3009 payments directly on chain, with no third party.

The gateway's own gas key sends ``transferWithAuthorization``; verification reads the balance
and ``authorizationState`` and simulates the transfer with ``eth_call``. web3 is synchronous,
so every call runs in a worker thread under a time-out; sends are serialised so that the gas
account's transaction nonces never collide.

:class:`ChainReader` is the proof of payment, for both modes: a settlement counts only when one
successful transaction receipt holds the asset's ``AuthorizationUsed(payer, nonce)`` *and*
``Transfer(payer → payTo, value)`` logs. ``authorizationState == true`` alone proves nothing:
``cancelAuthorization`` sets it too, with no transfer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from eth_account import Account
from eth_utils import to_checksum_address
from pydantic import SecretStr
from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound

from paygate import jsonsafe
from paygate.x402 import smartwallet
from paygate.x402.chain_upto import UptoChain
from paygate.x402.models import AnyPaymentPayload, SettleResponse, UptoEvmPayload, VerifyResponse
from paygate.x402.networks import resolve_network
from paygate.x402.settler import (
    NONCE_USED,
    ReviewRequired,
    SettlementUnknown,
    SettlerUnavailable,
)

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
_AUTH_ARGS = "address,address,uint256,uint256,uint256,bytes32"
_BY_VRS = f"transferWithAuthorization({_AUTH_ARGS},uint8,bytes32,bytes32)"
_BY_BYTES = f"transferWithAuthorization({_AUTH_ARGS},bytes)"
# Event topics (keccak256 of the signature), lowercase hex without 0x.
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


def _reason(message: str) -> str:
    """x402's reason for a FiatToken revert message."""
    message = message.lower()
    return next(
        (reason for text, reason in _REVERTS if text in message),
        "invalid_exact_evm_transaction_simulation_failed",
    )


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
        facts = _Facts.of(payment, requirements)
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

    async def _nonce_event(self, facts: _Facts) -> tuple[str, str] | None:
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
                        "0x" + _word(bytes.fromhex(facts.payer[2:])),
                        "0x" + facts.nonce.hex(),
                    ],
                },
            )
            for entry in reversed(list(logs)):
                topic = _hex(entry["topics"][0])
                if topic in (USED_TOPIC, CANCELED_TOPIC):
                    return topic, "0x" + _hex(entry["transactionHash"])
            high = low - 1
        return None


class ChainSettler:
    """Verify and settle on the chain behind ``rpc_url`` with the gas account of ``gas_key``."""

    def __init__(
        self,
        rpc_url: str,
        gas_key: SecretStr,
        *,
        timeout: float,
        settle_timeout: float,
        factories: Iterable[str] = (),
    ) -> None:
        self._chain = ChainReader(rpc_url, timeout=timeout)
        # ERC-6492 factories this gateway lets deploy a payer's wallet (in its settlement).
        self._factories = smartwallet.normalise_factories(factories)
        self._w3 = self._chain.w3
        self._upto = UptoChain(self._chain)
        self._account = Account.from_key(gas_key.get_secret_value())
        self._timeout = timeout
        self._settle_timeout = settle_timeout
        self._send_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        """The gas account: the sender of every settlement (upto's facilitator address)."""
        return str(self._account.address)

    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        if isinstance(payment.payload, UptoEvmPayload):
            return await self._upto.verify(payment, requirements, sender=self.address)
        auth = payment.payload.authorization
        payer = to_checksum_address(auth.from_)
        await self._check_chain(requirements)
        token = self._chain.token(requirements)
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
        if isinstance(payment.payload, UptoEvmPayload):
            return await self._settle_upto(payment, requirements)
        payer = to_checksum_address(payment.payload.authorization.from_)
        network = str(requirements["network"])
        reason = await self._simulate(payment, requirements)
        if reason == NONCE_USED:
            # Used since verify: by a transfer to us (paid) or a cancel (not): the chain says.
            return await self._chain.prove(payment, requirements, None)
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
        prove = self._upto.prove if isinstance(payment.payload, UptoEvmPayload) else None
        try:
            if prove is not None:
                return await prove(payment, requirements, transaction)
            return await self._chain.prove(payment, requirements, transaction)
        except ReviewRequired:
            raise
        except SettlementUnknown:
            # The nonce is unused: our transaction is still waiting, or it is gone (dropped,
            # replaced). Sending the same authorization again is safe: it executes once.
            if transaction and await self._chain.known(transaction):
                raise SettlementUnknown(
                    "the transaction is not mined yet", transaction=transaction
                ) from None
            return await self.settle(payment, requirements)

    async def close(self) -> None:
        return None

    # --- internals ---

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await self._chain.call(fn, *args)

    async def _check_chain(self, requirements: dict[str, Any]) -> None:
        await self._chain.check_chain(requirements)

    def _transfer(self, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> Any:
        """The token's ``transferWithAuthorization`` for ``payment``: (v, r, s) for an EOA's
        signature, the ``bytes`` overload for a contract wallet's (ERC-6492 wrapper off)."""
        auth = payment.payload.authorization
        signature = smartwallet.parse_hex(payment.payload.signature)  # ValueError: malformed
        token = self._chain.token(requirements)
        args = (
            to_checksum_address(auth.from_),
            to_checksum_address(auth.to),
            int(auth.value),
            int(auth.valid_after),
            int(auth.valid_before),
            bytes.fromhex(auth.nonce[2:]),
        )
        if not signature.is_ecdsa:
            return token.get_function_by_signature(_BY_BYTES)(*args, signature.inner)
        raw = signature.inner
        v = raw[64] if raw[64] >= 27 else raw[64] + 27
        return token.get_function_by_signature(_BY_VRS)(*args, v, raw[:32], raw[32:64])

    async def _deployment(self, payment: AnyPaymentPayload) -> smartwallet.Deployment | None:
        """The factory call a counterfactual payer needs first (ERC-6492), or None."""
        deployment = smartwallet.parse_hex(payment.payload.signature).deployment
        if deployment is None:
            return None
        payer = to_checksum_address(payment.payload.authorization.from_)
        if await self._call(self._w3.eth.get_code, payer):
            return None  # deployed since it signed: the wrapper is just unwrapped
        return deployment

    def _deploy_then(
        self, deployment: smartwallet.Deployment, transfer: Any, *, diagnose: bool = False
    ) -> Any:
        """One Multicall3 call: deploy the wallet, then the transfer. Sent, it is atomic (both
        or none; gas is estimated for both). ``diagnose`` (a simulation): a failed transfer
        does not revert the call, so its revert reason can be read."""
        multicall = self._w3.eth.contract(
            address=to_checksum_address(smartwallet.MULTICALL3_ADDRESS),
            abi=smartwallet.AGGREGATE3_ABI,
        )
        # The same call, as calldata (web3 encodes it by the exact overload's signature).
        data = bytes.fromhex(
            self._w3.eth.contract(address=transfer.address, abi=EIP3009_ABI)
            .encode_abi(transfer.signature, args=transfer.args)
            .removeprefix("0x")
        )
        return multicall.functions.aggregate3(
            [
                (deployment.factory, False, deployment.calldata),
                (transfer.address, diagnose, data),
            ]
        )

    async def _simulate(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> str | None:
        try:
            call = self._transfer(payment, requirements)
        except ValueError:
            return "invalid_exact_evm_payload_signature"
        deployment = await self._deployment(payment)
        if deployment is not None:
            return await self._simulate_deployed(deployment, call)
        try:
            await self._call(call.call, {"from": self._account.address})
        except ContractLogicError as exc:
            return _reason(str(exc))
        return None

    async def _simulate_deployed(
        self, deployment: smartwallet.Deployment, transfer: Any
    ) -> str | None:
        """The transfer of a wallet deployed first, in one ``eth_call``."""
        if not smartwallet.allowed(deployment.factory, self._factories):
            return smartwallet.FACTORY_NOT_ALLOWED
        try:
            results = await self._call(
                self._deploy_then(deployment, transfer, diagnose=True).call,
                {"from": self._account.address},
            )
        except ContractLogicError:
            return smartwallet.DEPLOYMENT_FAILED  # the factory call itself failed
        ok, data = results[1]
        return None if ok else _reason(smartwallet.revert_text(bytes(data)))

    async def _settle_upto(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """Settle ``requirements["amount"]`` of an upto payment through the proxy."""
        await self._check_chain(requirements)
        amount = int(requirements["amount"])
        reason = await self._upto.simulate(payment, amount, sender=self.address)
        if reason == "permit2_invalid_nonce":
            return await self._upto.prove(payment, requirements, None)  # used since verify
        if reason is not None:
            payer = to_checksum_address(payment.payload.permit2_authorization.from_)  # type: ignore[union-attr]
            network = str(requirements["network"])
            return SettleResponse(success=False, error_reason=reason, payer=payer, network=network)
        async with self._send_lock:
            tx_hash = await self._send_call(self._upto.settle_call(payment, amount))
        return await self._upto.await_receipt(
            tx_hash, payment, requirements, wait=self._settle_timeout, timeout=self._timeout
        )

    async def _send(self, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> str:
        transfer = self._transfer(payment, requirements)
        deployment = await self._deployment(payment)
        if deployment is not None:  # simulated just before: an allowed factory
            return await self._send_call(self._deploy_then(deployment, transfer))
        return await self._send_call(transfer)

    async def _send_call(self, call: Any) -> str:
        sender = self._account.address
        nonce = await self._call(self._w3.eth.get_transaction_count, sender, "pending")
        tx = await self._call(
            call.build_transaction,
            {"from": sender, "nonce": nonce, "chainId": self._chain.chain_id or 0},
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
        facts = _Facts.of(payment, requirements)
        if facts.proven_by(receipt):
            return facts.settled(tx_hash)
        # Reverted (or moved nothing): the nonce's own event says why — a cancel mined first?
        try:
            return await self._chain.prove(payment, requirements, None)
        except SettlementUnknown:
            return facts.failed(NOT_PROVEN, tx_hash)


@dataclass(frozen=True, slots=True)
class _Facts:
    """What a receipt must show for one payment."""

    token: str
    payer: str
    pay_to: str
    value: int
    nonce: bytes
    network: str

    @classmethod
    def of(cls, payment: AnyPaymentPayload, requirements: dict[str, Any]) -> _Facts:
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
        payer = _word(bytes.fromhex(self.payer[2:]))
        pay_to = _word(bytes.fromhex(self.pay_to[2:]))
        used = moved = False
        for entry in receipt.get("logs") or ():
            if to_checksum_address(entry["address"]) != self.token:
                continue
            topics = [_hex(topic) for topic in entry["topics"]]
            if topics == [USED_TOPIC, payer, self.nonce.hex()]:
                used = True
            elif topics == [TRANSFER_TOPIC, payer, pay_to] and _int(entry["data"]) == self.value:
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


def _hex(value: Any) -> str:
    if isinstance(value, str):
        return value.lower().removeprefix("0x")
    return bytes(value).hex()


def _word(raw: bytes) -> str:
    return raw.rjust(32, b"\0").hex()


def _int(value: Any) -> int:
    return int(_hex(value) or "0", 16)


def _invalid(reason: str, payer: str) -> VerifyResponse:
    return VerifyResponse(is_valid=False, invalid_reason=reason, payer=payer)
