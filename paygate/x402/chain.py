"""Chain mode: verify and settle EIP-3009 payments directly on chain, with no third party.

The gateway's own gas key sends ``transferWithAuthorization``; verification reads the balance
and ``authorizationState`` and simulates the transfer with ``eth_call``. web3 is synchronous,
so every call runs in a worker thread under a time-out; sends are serialised so that the gas
account's transaction nonces never collide.

A settlement counts only when ``chain_reader`` proves it (a receipt with both the
``AuthorizationUsed`` and the ``Transfer`` logs); upto's Permit2 settlement is ``chain_upto``'s.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

from eth_account import Account
from eth_utils import to_checksum_address
from pydantic import SecretStr
from web3.exceptions import ContractLogicError, TimeExhausted

from paygate.x402 import smartwallet
from paygate.x402.chain_reader import (
    EIP3009_ABI,
    NOT_PROVEN,
    ChainReader,
    TransferFacts,
)
from paygate.x402.chain_upto import UptoChain
from paygate.x402.exact_multicall import ExactMulticall
from paygate.x402.models import AnyPaymentPayload, ExactEvmPayload, SettleResponse, VerifyResponse
from paygate.x402.schemes import scheme_of
from paygate.x402.settler import (
    NONCE_USED,
    ReviewRequired,
    SettlementUnknown,
    SettlerUnavailable,
)

log = logging.getLogger("paygate.x402")
_Verify = Callable[[AnyPaymentPayload, dict[str, Any]], Awaitable[VerifyResponse]]
_Settle = Callable[[AnyPaymentPayload, dict[str, Any]], Awaitable[SettleResponse]]
_Prove = Callable[[AnyPaymentPayload, dict[str, Any], str | None], Awaitable[SettleResponse]]
_T = TypeVar("_T")

_AUTH_ARGS = "address,address,uint256,uint256,uint256,bytes32"
_BY_VRS = f"transferWithAuthorization({_AUTH_ARGS},uint8,bytes32,bytes32)"
_BY_BYTES = f"transferWithAuthorization({_AUTH_ARGS},bytes)"
# Event topics (keccak256 of the signature), lowercase hex without 0x.
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
        batch_window: float = 0.0,
        batch_max: int = 1,
    ) -> None:
        self._chain = ChainReader(rpc_url, timeout=timeout)
        # ERC-6492 factories this gateway lets deploy a payer's wallet (in its settlement).
        self._factories = smartwallet.normalise_factories(factories)
        self._w3 = self._chain.w3
        self._upto = UptoChain(self._chain)
        # Each scheme's chain work, under the registry's name for it (paygate.x402.schemes).
        self._verify_by: dict[str, _Verify] = {
            "exact": self._verify_exact,
            "upto": lambda payment, requirements: self._upto.verify(
                payment, requirements, sender=self.address
            ),
        }
        self._settle_by: dict[str, _Settle] = {
            "exact": self._settle_exact,
            "upto": self._settle_upto,
        }
        self._prove_by: dict[str, _Prove] = {"exact": self._chain.prove, "upto": self._upto.prove}
        self._account = Account.from_key(gas_key.get_secret_value())
        self._timeout = timeout
        self._settle_timeout = settle_timeout
        self._send_lock = asyncio.Lock()
        self._batcher: ExactMulticall | None = None
        if batch_max > 1:  # exact settlements share Multicall3 transactions (exact_multicall)
            self._batcher = ExactMulticall(
                self._chain,
                sender=self.address,
                transfer=self._transfer,
                send=self._send_call,
                send_lock=self._send_lock,
                single=self._settle_exact,
                reason=_reason,
                window=batch_window,
                max_batch=batch_max,
                settle_timeout=settle_timeout,
                timeout=timeout,
            )
            self._settle_by["exact"] = self._batcher.settle

    @property
    def address(self) -> str:
        """The gas account: the sender of every settlement (upto's facilitator address)."""
        return str(self._account.address)

    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        return await self._verify_by[scheme_of(payment).name](payment, requirements)

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        return await self._settle_by[scheme_of(payment).name](payment, requirements)

    async def _verify_exact(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        assert isinstance(payment.payload, ExactEvmPayload)
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

    async def _settle_exact(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        assert isinstance(payment.payload, ExactEvmPayload)
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
        prove = self._prove_by[scheme_of(payment).name]
        try:
            return await prove(payment, requirements, transaction)
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
        if self._batcher is not None:
            await self._batcher.close()

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

    async def _deployment(self, payment: AnyPaymentPayload) -> smartwallet.WalletDeployment | None:
        """The factory call a counterfactual payer needs first (ERC-6492), or None."""
        deployment = smartwallet.parse_hex(payment.payload.signature).deployment
        if deployment is None:
            return None
        payer = to_checksum_address(payment.payload.authorization.from_)
        if await self._call(self._w3.eth.get_code, payer):
            return None  # deployed since it signed: the wrapper is just unwrapped
        return deployment

    def _deploy_then(
        self, deployment: smartwallet.WalletDeployment, transfer: Any, *, diagnose: bool = False
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
        self, deployment: smartwallet.WalletDeployment, transfer: Any
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

    async def _send_call(self, call: Any, *, gas: int | None = None) -> str:
        sender = self._account.address
        nonce = await self._call(self._w3.eth.get_transaction_count, sender, "pending")
        fields = {"from": sender, "nonce": nonce, "chainId": self._chain.chain_id or 0}
        if gas is not None:  # given: not estimated (see exact_multicall)
            fields["gas"] = gas
        tx = await self._call(call.build_transaction, fields)
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
        facts = TransferFacts.of(payment, requirements)
        if facts.proven_by(receipt):
            return facts.settled(tx_hash)
        # Reverted (or moved nothing): the nonce's own event says why — a cancel mined first?
        try:
            return await self._chain.prove(payment, requirements, None)
        except SettlementUnknown:
            return facts.failed(NOT_PROVEN, tx_hash)


def _invalid(reason: str, payer: str) -> VerifyResponse:
    return VerifyResponse(is_valid=False, invalid_reason=reason, payer=payer)
