"""Facilitator mode for `batch-settlement` (server-only): what is sent to a facilitator's
``POST /settle`` and how its word is checked on chain.

The facilitator is the channels' receiver authorizer (its ``GET /supported`` announces
``kinds[].extra.receiverAuthorizer``); it relays and signs. The bodies are the x402
specification's (the official SDK 2.25's): the payer's deposit payload as it came; a ``claim``
of the channels' latest vouchers, then a ``settle`` sweeping the claimed funds to the receiver
(two transactions); a ``refund`` completed with the channel's refund nonce and a claim of what
was charged. The facilitator's answer is never taken for the fact: each move is proven on
chain as in chain mode (the deposit's transfer into the settlement contract, the channels'
claimed totals, the refund's balance) with the gateway's own RPC endpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from eth_utils import to_checksum_address

from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.models import SettleResponse
from paygate.x402.schemes.base import FacilitatorAccess
from paygate.x402.schemes.batch_settlement.chain import (
    BatchChain,
    Deposit,
    Head,
    OnChain,
    Pending,
    Refund,
    claimed_on_chain,
    not_bound,
    refunded_in,
    sweeps,
)
from paygate.x402.schemes.batch_settlement.channel import NAME
from paygate.x402.schemes.batch_settlement.payload import ChannelConfig
from paygate.x402.schemes.batch_settlement.store import ClaimEntry, Stamp
from paygate.x402.settler import SettlementSubject, SettlementUnknown, SettlerUnavailable

log = logging.getLogger("paygate.x402")


async def receiver_authorizer(settler: FacilitatorSettler, network: str) -> str:
    """The facilitator's receiver authorizer on ``network`` (its ``GET /supported``)."""
    for kind in await settler.supported():
        address = (kind.get("extra") or {}).get("receiverAuthorizer")
        if (
            kind.get("scheme") == NAME
            and kind.get("network") == network
            and kind.get("x402Version") == 2
            and isinstance(address, str)
        ):
            return to_checksum_address(address)
    raise SettlerUnavailable(f"the facilitator does not offer batch-settlement on {network}")


def _claim_row(entry: ClaimEntry) -> dict[str, Any]:
    return {
        "voucher": {"channel": entry.config.wire(), "maxClaimableAmount": str(entry.max_claimable)},
        "signature": entry.signature,
        "totalClaimed": str(entry.total),
    }


class BatchFacilitator:
    """The channels' moves through a facilitator, each proven with ``proof`` (read-only)."""

    def __init__(self, settler: FacilitatorSettler, proof: BatchChain, network: str) -> None:
        self._settler = settler
        self._proof = proof
        self._network = network

    async def state(self, channel_id: str, *, since: int = 0) -> OnChain:
        return await self._proof.state(channel_id, since=since)

    async def head(self) -> Head:
        return await self._proof.head()

    async def withdrawal_moves(self, first: int, last: int) -> list[tuple[str, str]]:
        return await self._proof.withdrawal_moves(first, last)

    async def pending_withdrawal(self, channel_id: str, block: int) -> Pending:
        return await self._proof.pending_withdrawal(channel_id, block)

    async def stamp(self, block: int) -> Stamp | None:
        return await self._proof.stamp(block)

    async def orphaned(self, stamp: Stamp) -> bool:
        return await self._proof.orphaned(stamp)

    def _requirements(self, config: ChannelConfig) -> dict[str, Any]:
        """A requirement naming the channel's receiver and token (what the facilitator routes a
        claim, sweep or refund by)."""
        return {
            "scheme": NAME,
            "network": self._network,
            "asset": to_checksum_address(config.token),
            "amount": "0",
            "payTo": to_checksum_address(config.receiver),
            "maxTimeoutSeconds": 300,
            "extra": {
                "receiverAuthorizer": config.receiver_authorizer,
                "withdrawDelay": config.withdraw_delay,
            },
        }

    async def _settle(self, requirements: dict[str, Any], payload: dict[str, Any]) -> Any:
        return await self._settler.settle_body(
            {
                "x402Version": 2,
                "paymentPayload": {"x402Version": 2, "accepted": requirements, "payload": payload},
                "paymentRequirements": requirements,
            }
        )

    async def deposit(self, deposit: Deposit) -> OnChain:
        answer = await self._settler.settle_body(
            {
                "x402Version": 2,
                "paymentPayload": deposit.payment,
                "paymentRequirements": deposit.requirements,
            }
        )
        if not answer.success or not answer.transaction:
            raise ValueError(
                answer.error_reason or "invalid_batch_settlement_evm_deposit_transaction_failed"
            )
        return await self._proof.proven_deposit(answer.transaction, deposit)

    async def send_claim(self, entries: list[ClaimEntry]) -> str:
        """The claim, then the sweep of what it claimed (best effort: a later sweep takes
        whatever is left); the claim's transaction hash."""
        requirements = self._requirements(entries[0].config)
        answer = await self._settle(
            requirements, {"type": "claim", "claims": [_claim_row(e) for e in entries]}
        )
        if not answer.success or not answer.transaction:
            raise ValueError(f"the facilitator refused the claim: {answer.error_reason}")
        for receiver, token in sweeps(entries):
            # Best effort, and nothing the claim's outcome hangs on: the claim is made, and its
            # transaction hash is what proves it. A sweep whose answer is lost (unknown) or
            # that could not be sent (unavailable) is left to the next claim's sweep.
            try:
                swept = await self._settle(
                    requirements, {"type": "settle", "receiver": receiver, "token": token}
                )
            except (SettlerUnavailable, SettlementUnknown) as exc:
                log.warning("the facilitator's sweep did not answer: %s", exc.code)
                continue
            if not swept.success:
                log.warning("the facilitator did not sweep: %s", swept.error_reason)
        return answer.transaction

    async def proven_claim(self, tx_hash: str | None, entries: tuple[ClaimEntry, ...]) -> bool:
        if tx_hash is None:
            return await claimed_on_chain(self, entries)
        receipt = await self._proof.receipt(tx_hash)
        if receipt["status"] != 1:
            return False
        return await claimed_on_chain(self, entries, since=int(receipt["blockNumber"]))

    async def refund(self, refund: Refund) -> tuple[str, OnChain, int]:
        payload = {
            "type": "refund",
            "channelConfig": refund.config.wire(),
            "voucher": refund.voucher,
            "amount": str(refund.amount),
            "refundNonce": str(await self._proof.refund_nonce(refund.channel_id)),
            "claims": [_claim_row(refund.claim)] if refund.claim is not None else [],
        }
        answer = await self._settle(refund.requirements, payload)
        if not answer.success or not answer.transaction:
            raise ValueError(
                answer.error_reason or "invalid_batch_settlement_evm_refund_transaction_failed"
            )
        receipt = await self._proof.receipt(answer.transaction)
        if receipt["status"] != 1:
            raise ValueError("invalid_batch_settlement_evm_refund_transaction_failed")
        after = await self.state(refund.channel_id, since=int(receipt["blockNumber"]))
        return answer.transaction, after, refunded_in(receipt, refund.channel_id)


class BatchSettlementFacilitator:
    """The facilitator settler's role: as in chain mode (``chain.BatchSettlementChain``), a
    channel payment is committed by the bound scheme, never sent to /settle as a payment;
    :class:`BatchFacilitator` is what moves a channel's money through a facilitator."""

    async def judge(
        self, facilitator: FacilitatorAccess, answer: SettleResponse, subject: SettlementSubject
    ) -> SettleResponse:
        raise not_bound()

    async def reconcile(
        self, facilitator: FacilitatorAccess, subject: SettlementSubject
    ) -> SettleResponse:
        raise not_bound()


ROLE = BatchSettlementFacilitator()
