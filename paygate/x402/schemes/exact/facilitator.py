"""``exact`` through a facilitator: judging its settle answer and reconciling a lost one.

The facilitator API has no status query; EIP-3009 executes an authorization once, so a lost
answer is reconciled by re-sending the same authorization and letting the chain decide: "nonce
already used" proves nothing (a cancel looks the same) and is proven on chain when it can be
read, otherwise left owed for review — never recorded as paid.
"""

from __future__ import annotations

from dataclasses import replace

from paygate.x402.models import SettleResponse
from paygate.x402.schemes.base import FacilitatorAccess, refused
from paygate.x402.schemes.exact.transfer import prove
from paygate.x402.schemes.exact.verify import NONCE_USED
from paygate.x402.settler import ReviewRequired, SettlementSubject, SettlementUnknown


class ExactFacilitator:
    async def judge(
        self, facilitator: FacilitatorAccess, answer: SettleResponse, subject: SettlementSubject
    ) -> SettleResponse:
        if refused(answer, NONCE_USED):
            return answer  # a plain refusal: nothing moved
        used = not answer.success and answer.error_reason == NONCE_USED
        transaction = answer.transaction or subject.transaction
        chain = facilitator.chain
        if answer.success and answer.transaction and chain is None:
            return answer
        if chain is not None:
            try:
                return await prove(chain, replace(subject, transaction=transaction))
            except ReviewRequired:
                raise
            except SettlementUnknown:
                if used:  # used, yet unused on our chain's view: nobody here can tell
                    raise ReviewRequired(
                        "the facilitator says the nonce is used; the chain does not show it",
                        transaction=transaction,
                        withhold=True,
                    ) from None
                raise
        if answer.success:
            what = "the facilitator answered success without a transaction"
        else:
            what = "the nonce is already used" if used else "the settlement is pending"
        raise ReviewRequired(
            f"{what}; no chain_rpc_url to prove it", transaction=transaction, withhold=used
        )

    async def reconcile(
        self, facilitator: FacilitatorAccess, subject: SettlementSubject
    ) -> SettleResponse:
        chain, transaction = facilitator.chain, subject.transaction
        try:
            answer = await facilitator.send(subject.payment, subject.requirements)
        except SettlementUnknown:
            if chain is None:
                raise
            return await prove(chain, subject)
        if not refused(answer, NONCE_USED):
            return await self.judge(facilitator, answer, subject)
        # A refusal of the re-sent authorization says nothing of the first attempt's fate.
        if chain is None:
            raise ReviewRequired(
                f"the re-sent authorization was refused ({answer.error_reason}); "
                "the first attempt is unproven and no chain_rpc_url can prove it",
                transaction=transaction,
            )
        try:
            return await prove(chain, subject)
        except ReviewRequired:
            raise
        except SettlementUnknown:
            if transaction and await chain.known(transaction):
                raise  # our first transaction still waits to be mined
            return answer  # nothing executed on chain: the refusal stands


ROLE = ExactFacilitator()
