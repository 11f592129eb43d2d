"""What the payment policy produces for a request: a refusal, an admission, a receipt.

Plain data, shared by admission (``paygate.x402.processor``), the session, the settlement steps
and strategies, so that none imports another's module for its types.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from paygate import wire
from paygate.x402 import codec
from paygate.x402.ledger import Meter, PaymentRecord
from paygate.x402.models import AnyPaymentPayload, SettleResponse
from paygate.x402.offers import EXACT
from paygate.x402.schemes import SCHEMES, Authorized, Scheme


@dataclass(frozen=True, slots=True)
class Receipt:
    """A settlement result for the caller, in the header of the payment's version."""

    version: int
    response: SettleResponse
    # Settlement was refused for good: a non-streamed reply is withheld (402) rather than given
    # away; a stream's content is already out, so only the receipt says so.
    withhold: bool = False

    @property
    def header(self) -> str:
        return wire.PAYMENT_RESPONSE if self.version == 2 else wire.X_PAYMENT_RESPONSE

    def encoded(self) -> str:
        return codec.encode(self.response)


@dataclass(slots=True)
class PaymentAdmission:
    """An admitted request's payment: free (``record`` None) or a reserved, verified payment."""

    price: Decimal
    record: PaymentRecord | None = None
    payment: AnyPaymentPayload | None = field(default=None, repr=False)
    requirements: dict[str, Any] = field(default_factory=dict, repr=False)
    receipt: Receipt | None = None
    settle_task: asyncio.Task[Receipt | None] | None = field(default=None, repr=False)
    finished: bool = False
    scheme: Scheme = field(default=SCHEMES[EXACT], repr=False)
    authorized: Authorized | None = None
    # A metered (upto) request's usage and charge, set by the reply stage before settling.
    meter: Meter | None = None
    # A free request (sign-in-with-x): how many are left today.
    free_remaining: int | None = None
    # The reply stage keeps a signed receipt of this reply before its end leaves: a SERVED
    # recorded at the reply (verify-only) waits for it and goes in its ledger transaction
    # (``served_deferred``), else at the request's end.
    receipt_follows: bool = False
    served_deferred: bool = False
    # The reply's signed receipt (token, the usage it states), signed before a settlement
    # that is a charge in this ledger (its claims are the same before the charge as after:
    # such a charge names no transaction), for that settlement's transaction to keep;
    # ``receipt_kept`` once it did. ``publish_receipt`` records it in the transparency log,
    # called by that transaction's task once it is made (whether or not the caller is still
    # there): the ledger keeps no reply receipt the log was not given.
    reply_receipt: tuple[str, Mapping[str, Any] | None] | None = field(default=None, repr=False)
    publish_receipt: Callable[[str], Awaitable[None]] | None = field(default=None, repr=False)
    receipt_kept: bool = False
    # The fenced ledger write that records this payment's charge (SETTLING, or a channel's
    # charge) was refused or not made: ``lease_lost`` (another replica took the payment: this
    # process was stalled past its lease) or ``ledger_unavailable``. No reply or receipt may
    # then claim the charge (paygate.server.replies withholds it).
    unrecorded: str | None = None
    # Released with nothing earned (:func:`paygate.x402.settlement.release_unearned`): never
    # charged, whatever the reply's status said (a caller gone mid-stream, settle_on_disconnect
    # off).
    released: bool = False

    @property
    def paid(self) -> bool:
        return self.record is not None

    @property
    def payer(self) -> str | None:
        return self.record.payer if self.record else None

    @property
    def metered(self) -> bool:
        return self.paid and self.scheme.metered

    @property
    def owed(self) -> int:
        """Atomic units to settle: the metered charge, else the amount signed."""
        assert self.record is not None
        if self.meter is not None:
            return self.meter.settle_amount
        return self.record.owed
