"""``upto`` through a facilitator: the proof is the proxy's Transfer of the amount settled.

The SDK's facilitator never answers "already used" for upto (a spent Permit2 nonce is
"transaction failed"), so a refusal is final; pending or hashless success is proven on chain
when it can be read, otherwise left owed for review. A lost answer is reconciled on chain first
(an unused nonce means nothing was settled, so sending again is safe).
"""

from __future__ import annotations

from dataclasses import replace

from paygate.x402.models import SettleResponse
from paygate.x402.schemes.base import FacilitatorAccess, refused
from paygate.x402.schemes.upto.chain import ROLE as CHAIN
from paygate.x402.settler import ReviewRequired, SettlementSubject, SettlementUnknown


class UptoFacilitator:
    async def judge(
        self, facilitator: FacilitatorAccess, answer: SettleResponse, subject: SettlementSubject
    ) -> SettleResponse:
        if refused(answer):
            return answer  # a refusal: nothing moved (the SDK never answers "already used")
        transaction = answer.transaction or subject.transaction
        if facilitator.chain is None:
            if answer.success and answer.transaction:
                return answer
            raise ReviewRequired(
                "the upto settlement is pending or has no transaction; no chain_rpc_url to "
                "prove it",
                transaction=transaction,
            )
        return await CHAIN.prove(facilitator.chain, replace(subject, transaction=transaction))

    async def reconcile(
        self, facilitator: FacilitatorAccess, subject: SettlementSubject
    ) -> SettleResponse:
        chain, transaction = facilitator.chain, subject.transaction
        if chain is not None:
            try:
                return await CHAIN.prove(chain, subject)
            except ReviewRequired:
                raise
            except SettlementUnknown:
                if transaction and await chain.known(transaction):
                    raise  # our first transaction still waits to be mined
            # The nonce is unused on chain: nothing was settled, sending again is safe.
            answer = await facilitator.send(subject.payment, subject.requirements)
            return await self.judge(facilitator, answer, subject)
        answer = await facilitator.send(subject.payment, subject.requirements)
        if answer.success:
            return answer
        # The SDK answers a spent Permit2 nonce with "transaction failed", not "already used":
        # without a chain to read, the first attempt's fate is unknown.
        raise ReviewRequired(
            f"the re-sent upto authorization was refused ({answer.error_reason}); the first "
            "attempt is unproven and no chain_rpc_url can prove it",
            transaction=transaction,
        )


ROLE = UptoFacilitator()
