"""Free requests: a wallet's daily quota, proven with sign-in-with-x (paygate.x402.siwx), and a
per-address allowance so that fresh wallets from one host share that host's.

Both are counted in the ledger, in one transaction per free request, so that every worker
(``--workers``) and every replica on the ledger shares them: one address rotating wallets across
N processes still gets its cap once, not N times. The ledger keeps an address as a keyed digest
(HMAC-SHA256 under the deployment's sign-in key), not as the address itself.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit

from paygate.x402 import siwx
from paygate.x402.hooks import PayerCheck
from paygate.x402.ledger import FreeAddressUsed, LedgerUnavailable, SignInReused
from paygate.x402.ledger_base import Ledger
from paygate.x402.models import ResourceInfo
from paygate.x402.offers import Offer, PaymentTerms
from paygate.x402.refusal import Refusal
from paygate.x402.refusals import Refusals, payer_limited
from paygate.x402.results import PaymentAdmission
from paygate.x402.settler import SettlerUnavailable
from paygate.x402.smartwallet import WalletVerifier

ADDRESS_DIGEST = b"paygate free address\x00"  # what the address digests are keyed for


@dataclass(slots=True, kw_only=True)
class FreeQuota:
    """Today's free requests per wallet and per client address key, both in the ledger."""

    terms: PaymentTerms
    ledger: Ledger
    refusals: Refusals
    per_day: int
    per_address: int | None = None  # None or 0: as many as a wallet's (``per_day``)
    payer_check: PayerCheck | None = None
    wallets: WalletVerifier | None = None  # contract-wallet sign-ins: asked on chain (smartwallet)
    clock: Callable[[], float] = time.time

    async def load_signin_key(self) -> None:
        """At start: the deployment's sign-in key, from the ledger."""
        if self.per_day > 0:
            self.refusals.signin_key = await self.ledger.signin_key()

    async def admit(
        self,
        signin: str,
        price: Decimal,
        offers: tuple[Offer, ...],
        resource: ResourceInfo,
        route: str,
        model: str | None,
        items: tuple[tuple[str, str | None], ...] = (),
        client: str = "",
    ) -> PaymentAdmission | Refusal:
        """One of the wallet's free requests today, proven with sign-in-with-x, or a 402;
        the caller's address (key) has its own daily allowance, whatever the wallet."""
        refusals = self.refusals
        now = self.clock()
        parts = urlsplit(resource.url)
        try:
            proof = siwx.parse(signin)
            payer = await siwx.verify_wallet(
                proof,
                origin=f"{parts.scheme}://{parts.netloc}",
                networks=[a.network.caip2 for a in self.terms.accepted],
                now=now,
                key=refusals.signin_key,
                wallets=self.wallets,
            )
        except siwx.SiwxRejected as exc:
            return refusals.challenge(402, exc.reason, str(exc), offers, resource)
        except SettlerUnavailable as exc:
            return refusals.unavailable("payment_verifier_unavailable", str(exc))
        limited = payer_limited(self.payer_check, route, model, items, payer)
        if limited is not None:
            return limited
        day = time.strftime("%Y-%m-%d", time.gmtime(now))
        try:
            left = await self.ledger.take_free(
                payer=payer,
                nonce=proof.nonce,
                day=day,
                limit=self.per_day,
                address=self.address_digest(client),
                address_limit=self.per_address or self.per_day,
            )
        except FreeAddressUsed:
            return refusals.challenge(
                402,
                "free_quota_exhausted",
                "today's free requests from this address are used: pay",
                offers,
                resource,
            )
        except SignInReused:
            return refusals.challenge(
                402, "invalid_siwx_nonce", "this sign-in was already used", offers, resource
            )
        except LedgerUnavailable:
            return refusals.ledger_unavailable()
        if left is None:
            return refusals.challenge(
                402, "free_quota_exhausted", "today's free requests are used: pay", offers, resource
            )
        return PaymentAdmission(price=price, free_remaining=left)

    def address_digest(self, client: str) -> str:
        """How the ledger keeps ``client`` (an address key, paygate.server.forwarded): the same
        in every process on the ledger (one sign-in key), and not the address in clear."""
        key = self.refusals.signin_key
        return hmac.new(key, ADDRESS_DIGEST + client.encode(), hashlib.sha256).hexdigest()
