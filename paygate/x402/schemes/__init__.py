"""The payment schemes: one package per scheme, and :data:`SCHEMES`, the one registry.

Everything that depends on the kind of payment goes through here: the processor, the
settlement, the ticket and the receipts find a payment's scheme with :func:`scheme_of` (by its
payload's type) or :func:`by_name` (an offer's or a ledger record's ``scheme``); the chain and
facilitator settlers call its ``chain``/``facilitator`` role; the client's payer calls its
``client`` role. Nothing outside ``schemes/`` tests a payload's type or a scheme's name.

A new scheme is one package ``schemes/<name>/`` providing (protocols in :mod:`.base`):

- ``payload.py``: the scheme's payload models, its payment's ``payload`` registered under the
  scheme's name with :func:`~paygate.x402.models.register_payload` (imported by
  :func:`~.base.scheme_package`; a payment naming the scheme is validated by it);
- ``offer.py``: ``ROLE``, an :class:`~.base.OfferRole` (the requirement verified and settled
  against; what the ledger counts as authorized; whether x402 v1 carries it);
- ``verify.py``: ``ROLE``, a :class:`~.base.VerifyRole` (its payload model, replay code,
  local checks raising :class:`~.base.PaymentRejected`, expiry);
- ``chain.py``: ``ROLE``, a :class:`~.base.ChainRole` (chain-mode verify/settle and the proof
  of payment; may import web3: it is loaded only when a settler first needs it);
- ``facilitator.py``: ``ROLE``, a :class:`~.base.FacilitatorRole` (judging a settle answer,
  reconciling a lost one; server-only, loaded likewise);
- ``client.py``: ``ROLE``, a :class:`~.base.ClientRole` (which offers it pays, signing;
  eth-account only: the client imports it);
- ``__init__.py``: ``SCHEME``, the :class:`~.base.Scheme` built from those roles by
  :func:`~.base.scheme_package` (the server-only ones named by module path);
- optionally ``bound.py``, a binding role (``binding=True``; server-only, a
  :class:`~.base.BindingRole`):
  a scheme whose payments live in the gateway's own state is bound at start to its ledger,
  settler and settings, and its bound ``Scheme`` answers the hooks every scheme has (its own
  offers, operations that are not paid requests, corrective refusals, background tasks).

It is registered by adding its ``SCHEME`` to :data:`SCHEMES` below — the one line outside its
package (the configuration names it in ``PAYGATE_PAYMENT_SCHEMES``). Importing this module
registers every scheme's payload model, so that every payment parsed afterwards knows them all,
and loads only the client-safe roles (no web3, no x402 SDK).
"""

from __future__ import annotations

from paygate.errors import PaygateError
from paygate.x402.models import AnyPaymentPayload
from paygate.x402.schemes import batch_settlement, exact, upto
from paygate.x402.schemes.base import Authorized, Binding, PaymentRejected, Scheme

SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme for scheme in (exact.SCHEME, upto.SCHEME, batch_settlement.SCHEME)
}


class UnknownScheme(PaygateError, ValueError):
    """A payment whose payload belongs to no registered scheme."""

    code = "unsupported_scheme"
    message = "the payment's payload belongs to no known scheme"


def scheme_of(payment: AnyPaymentPayload) -> Scheme:
    """The registered scheme whose payload ``payment`` carries."""
    for scheme in SCHEMES.values():
        if isinstance(payment.payload, scheme.payload_type):
            return scheme
    raise UnknownScheme("the payment's payload belongs to no known scheme")


def by_name(name: str) -> Scheme | None:
    """The registered scheme called ``name`` (an offer's, a challenge's, a record's), or None."""
    return SCHEMES.get(name)


__all__ = [
    "SCHEMES",
    "Authorized",
    "Binding",
    "PaymentRejected",
    "Scheme",
    "UnknownScheme",
    "by_name",
    "scheme_of",
]
