"""Chain mode: verify and settle payments directly on chain, with no third party.

The gateway's own gas key sends each settlement; what is sent, simulated and proven is the
payment's scheme's (``schemes/<scheme>/chain.py``, found through the registry). This settler
lends the schemes what they share: the :class:`~paygate.x402.chain_reader.ChainReader`, the gas
account, sending (serialised, so that the gas account's transaction nonces never collide),
waiting for a receipt, and the batching options (``chain_batch_max``/``_window_ms``): the settler
says how many settlements may share a transaction, the scheme decides whether it can (exact does,
in ``schemes/exact/multicall.py``), so nothing here names a scheme. web3 is synchronous: every
call runs in a worker thread under a time-out.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from eth_account import Account
from pydantic import SecretStr

from paygate.x402 import smartwallet
from paygate.x402.chain_reader import ChainReader
from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse
from paygate.x402.schemes import scheme_of
from paygate.x402.schemes.base import Batching, Closable
from paygate.x402.settler import (
    ReviewRequired,
    SettlementSubject,
    SettlementUnknown,
    SettlerUnavailable,
)

log = logging.getLogger("paygate.x402")

_Kept = TypeVar("_Kept", bound=Closable)


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
        self.reader = ChainReader(rpc_url, timeout=timeout)
        # ERC-6492 factories this gateway lets deploy a payer's wallet (in its settlement).
        self.factories = smartwallet.normalise_factories(factories)
        self._account = Account.from_key(gas_key.get_secret_value())
        self._timeout = timeout
        self._settle_timeout = settle_timeout
        self._send_lock = asyncio.Lock()
        # Options, not a batcher: the scheme that can batch builds its own (self.kept).
        self.batching = Batching(max=batch_max, window=batch_window)
        self._kept: dict[str, Closable] = {}
        self._closed = False

    @property
    def address(self) -> str:
        """The gas account: the sender of every settlement (upto's facilitator address)."""
        return str(self._account.address)

    async def verify(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        return await scheme_of(payment).chain.verify(self, payment, requirements)

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        return await scheme_of(payment).chain.settle(self, payment, requirements)

    async def reconcile(self, subject: SettlementSubject) -> SettleResponse:
        transaction = subject.transaction
        try:
            return await scheme_of(subject.payment).chain.prove(self.reader, subject)
        except ReviewRequired:
            raise
        except SettlementUnknown:
            # The nonce is unused: our transaction is still waiting, or it is gone (dropped,
            # replaced). Sending the same authorization again is safe: it executes once.
            if transaction and await self.reader.known(transaction):
                raise SettlementUnknown(
                    "the transaction is not mined yet", transaction=transaction
                ) from None
            return await self.settle(subject.payment, subject.requirements)

    async def close(self) -> None:
        """Close what the schemes keep here (a batch being filled), each within the time a
        settlement may take."""
        self._closed = True
        kept, self._kept = list(self._kept.values()), {}
        for thing in kept:
            try:
                await asyncio.wait_for(thing.close(), self._settle_timeout + self._timeout)
            except TimeoutError:
                log.warning("a settlement still running at close: reconciled after restart")

    # --- what the schemes' chain roles use (schemes.base.ChainAccess) ---

    async def send(self, call: Any, *, gas: int | None = None) -> str:
        """Sign ``call`` with the gas account and send it; its hash. One at a time.
        ``gas``: the limit, not estimated (a batch's: see schemes/exact/multicall.py)."""
        # Asked here too, never "0": a settlement after a restart may come before any verify.
        chain_id = await self.reader.served_chain()
        async with self._send_lock:
            return await self.reader.send(self._account, call, chain_id=chain_id, gas=gas)

    async def mined(self, transaction: str) -> Any:
        """The receipt of ``transaction``, waited for up to the settle time-out."""
        return await self.reader.mined(transaction, self._settle_timeout)

    def kept(self, key: str, make: Callable[[], _Kept]) -> _Kept:
        """The object a scheme keeps with this settler under ``key`` (made on first use)."""
        if self._closed:
            raise SettlerUnavailable("the gateway is stopping")
        thing = self._kept.get(key)
        if thing is None:
            thing = self._kept[key] = make()
        return thing  # type: ignore[return-value]
