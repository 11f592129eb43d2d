"""Reading the chain: the bounded, timed RPC access every chain module shares.

Each scheme's proof of payment (``schemes/<scheme>/chain.py``), chain mode's settler
(``chain``) and the smart-wallet checks (``smartwallet``) read the chain through a
:class:`ChainReader`: every call runs in a worker thread under a time-out, answers are parsed
under paygate's JSON bounds, and an endpoint serving another chain is refused. It imports none
of them, so they all point down to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from web3 import Web3
from web3.exceptions import ContractLogicError, TimeExhausted, TransactionNotFound

from paygate import jsonsafe
from paygate.x402.networks import resolve_network
from paygate.x402.settler import SettlementUnknown, SettlerUnavailable

if TYPE_CHECKING:
    from eth_account.signers.local import LocalAccount

log = logging.getLogger("paygate.x402")
_T = TypeVar("_T")

# How far back eth_getLogs looks for a nonce's event, in chunks hosted RPCs accept.
LOG_WINDOW_BLOCKS = 50_000
LOG_CHUNK_BLOCKS = 5_000


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
        self.log_window = log_window
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

    async def mined(self, transaction: str, settle_timeout: float) -> Any:
        """The receipt of ``transaction``, waited for up to ``settle_timeout`` (polling every
        0.1 s); SettlementUnknown when none came (not mined yet, or the endpoint failed)."""
        try:
            return await asyncio.wait_for(
                asyncio.to_thread(
                    self.w3.eth.wait_for_transaction_receipt, transaction, settle_timeout, 0.1
                ),
                settle_timeout + self._timeout,
            )
        except (TimeoutError, TimeExhausted):
            raise SettlementUnknown("no receipt yet", transaction=transaction) from None
        except Exception as exc:  # web3's connection errors have many classes
            log.warning("waiting for a receipt failed: %s", type(exc).__name__)
            raise SettlementUnknown("no receipt yet", transaction=transaction) from None

    async def send(
        self, account: LocalAccount, call: Any, *, chain_id: int, gas: int | None = None
    ) -> str:
        """Build ``call`` (a web3 contract call) into a transaction from ``account`` at its
        pending nonce, sign and send it: its hash. ``gas``: the limit, not estimated. The
        caller serialises its sends (nonces). SettlementUnknown when the node may or may not
        have it: the hash is known, so it is reconciled by it."""
        fields: dict[str, Any] = {"from": account.address, "chainId": chain_id}
        fields["nonce"] = await self.call(
            self.w3.eth.get_transaction_count, account.address, "pending"
        )
        if gas is not None:
            fields["gas"] = gas
        signed = account.sign_transaction(await self.call(call.build_transaction, fields))
        tx_hash = "0x" + bytes(signed.hash).hex()
        try:
            await self.call(self.w3.eth.send_raw_transaction, signed.raw_transaction)
        except SettlerUnavailable:
            raise SettlementUnknown(
                "the transaction may not have been sent", transaction=tx_hash
            ) from None
        return tx_hash

    async def served_chain(self) -> int:
        """The id of the chain the endpoint serves (asked once)."""
        if self.chain_id is None:
            self.chain_id = int(await self.call(lambda: self.w3.eth.chain_id))
        return self.chain_id

    async def check_chain(self, requirements: dict[str, Any]) -> None:
        """The endpoint must serve the payment's chain: another chain's state proves nothing."""
        if resolve_network(str(requirements["network"])).chain_id != await self.served_chain():
            raise SettlerUnavailable("the RPC endpoint serves another chain")

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

    async def logs_newest_first(self, address: str, topics: list[Any]) -> AsyncIterator[Any]:
        """``address``'s logs matching ``topics`` in the last ``log_window`` blocks, newest
        first, asked for in chunks of ``log_chunk`` blocks."""
        latest = int(await self.call(lambda: self.w3.eth.block_number))
        oldest = max(0, latest - self.log_window)
        high = latest
        while high >= oldest:
            low = max(oldest, high - self._log_chunk + 1)
            logs = await self.call(
                self.w3.eth.get_logs,
                {"address": address, "fromBlock": low, "toBlock": high, "topics": topics},
            )
            for entry in reversed(list(logs)):
                yield entry
            high = low - 1


class BoundedHTTPProvider(Web3.HTTPProvider):
    """web3's HTTP provider with the RPC's answers parsed under paygate's JSON bounds."""

    def decode_rpc_response(self, raw_response: bytes) -> Any:
        return jsonsafe.loads(raw_response, max_bytes=MAX_RPC_ANSWER_BYTES)


MAX_RPC_ANSWER_BYTES = 16 * 1024 * 1024  # a block range's logs can be large
