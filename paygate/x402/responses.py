"""The payment facts a receipt carries: the settlement response (x402's PAYMENT-RESPONSE) that a
payment's ledger record or a settler's answer gives, with a metered payment's usage and charge.
Sans-IO; the settlement steps, recovery, idempotent retries and replays all answer with these.
"""

from __future__ import annotations

from paygate.x402.ledger import PaymentRecord, PaymentState
from paygate.x402.models import USAGE_EXTENSION, SettleResponse
from paygate.x402.networks import resolve_network
from paygate.x402.results import Receipt
from paygate.x402.schemes import SCHEMES


def with_usage(answer: SettleResponse, record: PaymentRecord) -> SettleResponse:
    """A metered payment's receipt names the usage it was charged for and its maximum."""
    if not SCHEMES[record.scheme].metered or record.tokens_in is None:
        return answer
    usage = {
        "promptTokens": record.tokens_in,
        "completionTokens": record.tokens_out,
        "source": record.usage_source,
        "maximum": str(record.amount),
        "charged": str(record.owed),
    }
    return answer.model_copy(
        update={"extensions": {**(answer.extensions or {}), USAGE_EXTENSION: {"info": usage}}}
    )


def moved(answer: SettleResponse, owed: int) -> int:
    """The atomic units a successful settlement moved (the answer's amount when it says)."""
    if answer.amount is not None and answer.amount.isdigit():
        return int(answer.amount)
    return owed


def wire_network(record: PaymentRecord) -> str:
    """The record's network as its x402 version names it (v1: a name, v2: CAIP-2)."""
    if record.x402_version == 1:
        return resolve_network(record.network).name
    return record.network


def recorded_response(record: PaymentRecord) -> SettleResponse:
    """The settlement response a ledger record stands for (a retry's or replay's answer)."""
    return with_usage(
        SettleResponse(
            success=record.state is PaymentState.SETTLED,
            error_reason=record.error,
            payer=record.payer,
            transaction=record.transaction or "",
            network=wire_network(record),
            amount=str(record.owed if record.settled_amount is None else record.settled_amount),
        ),
        record,
    )


def recorded_receipt(record: PaymentRecord) -> Receipt:
    """:func:`recorded_response` in the header of the record's x402 version."""
    return Receipt(record.x402_version, recorded_response(record))


_REASONS = {
    "insufficient_funds": "the payer's balance is too low",
    "invalid_exact_evm_insufficient_balance": "the payer's balance is too low",
    "invalid_exact_evm_nonce_already_used": "this payment authorization was already used",
    "invalid_upto_evm_nonce_already_used": "this payment authorization was already used",
    "invalid_exact_evm_payload_signature": "the signature is not the payer's",
}


def reason_text(reason: str) -> str:
    """A refusal reason (a facilitator's code) in words for the caller."""
    return _REASONS.get(reason, f"payment refused: {reason}")
