"""``exact`` in chain mode (web3; server-only): the chain role.

The gateway's gas account sends the token's ``transferWithAuthorization`` (``transfer``), one
payment a transaction or several in one Multicall3 transaction (``multicall``, when the settler
batches); verification reads the balance and ``authorizationState`` and simulates the transfer
with ``eth_call``. The proof of payment is ``transfer.prove``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from eth_utils import to_checksum_address

from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse
from paygate.x402.schemes.base import invalid, verdict
from paygate.x402.schemes.exact.multicall import ExactMulticall
from paygate.x402.schemes.exact.transfer import (
    INSUFFICIENT_BALANCE,
    prove,
    settle_one,
    simulate,
    token,
)
from paygate.x402.schemes.exact.verify import NONCE_USED, payload_of

if TYPE_CHECKING:
    from paygate.x402.schemes.base import ChainAccess


class ExactChain:
    async def verify(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        auth = payload_of(payment).authorization
        payer = to_checksum_address(auth.from_)
        reader = chain.reader
        await reader.check_chain(requirements)
        contract = token(reader, requirements)
        nonce = bytes.fromhex(auth.nonce[2:])
        balance = await reader.call(contract.functions.balanceOf(payer).call)
        if balance < int(auth.value):
            return invalid(INSUFFICIENT_BALANCE, payer)
        if await reader.call(contract.functions.authorizationState(payer, nonce).call):
            return invalid(NONCE_USED, payer)
        return verdict(await simulate(chain, payment, requirements), payer)

    async def settle(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        if chain.batching.max > 1:  # the batch checks each payment's chain before sending
            batcher = chain.kept("exact.multicall", lambda: ExactMulticall(chain))
            return await batcher.settle(payment, requirements)
        return await settle_one(chain, payment, requirements)

    prove = staticmethod(prove)


ROLE = ExactChain()
