"""The ``batch-settlement`` scheme (x402, EVM): pay once into a channel, then a voucher a request.

A payer deposits into a channel of the x402BatchSettlement contract once (the first payment
carries the deposit and its first voucher); each request then carries a voucher: the payer's
signature on the cumulative total the seller may claim (what was charged so far plus this
request's price). Per request, nothing touches the network: the voucher is checked locally
(:mod:`.verify`) against the channel's state in the payment ledger (:mod:`.store`), the charge
— the request's price, or on a metered route what it used, up to the price — is committed there
with the voucher, and the seller claims many channels' latest vouchers in one transaction
later (:mod:`.claims`, :mod:`.chain`). A refund request returns what was not charged.

Roles: :mod:`.offer` (the 402's entry), :mod:`.verify` (a voucher's own checks), :mod:`.client`
(the payer's side, client-safe; paygate's one-shot payer declines these offers), :mod:`.chain`
and :mod:`.facilitator` (how the channels' money moves: the gas key's transactions or a
facilitator's, each proven on chain; their settler roles refuse, since a channel payment never
goes to a settler), and the optional :mod:`.bound` (the binding role: at start, the scheme
bound to the gateway's ledger and chain — it verifies and commits vouchers against the channel
state in the ledger, makes the offers naming the gateway's receiver authorizer, answers refunds
and the corrective 402, and runs the claim loop). :mod:`.channel` holds the EIP-712 messages,
:mod:`.store` the channel tables (ledger migration 8), :mod:`.claims` the claims and refunds.
"""

from __future__ import annotations

from paygate.x402.schemes.base import scheme_package
from paygate.x402.schemes.batch_settlement.channel import NAME

# The charge is decided after the reply (a metered route's usage, up to the voucher's
# increment); a flat route charges its price.
SCHEME = scheme_package(__name__, NAME, metered=True, binding=True)

__all__ = ["NAME", "SCHEME"]
