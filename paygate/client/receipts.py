"""Check the signed receipt of every paid or sealed reply from an attested appliance, and hold
the reply's end back until it is checked.

Where the gateway puts it (paygate.server.receipts, docs/ATTESTATION.md): whole replies carry
``X-Paygate-Receipt`` (sealed to the caller on a sealed reply) over the whole plaintext;
streams carry it last, in-band: an SSE comment ``: paygate-receipt <token>`` (digest of the
plaintext before that line) or a ``paygate_receipt`` entry on NDJSON's final object (digest of
the plaintext before that line and the line without the entry), for v2 inside the final
sealed frame.

Sans-IO: a :class:`ReceiptCheck` sits between the opened plaintext and the caller. It passes
the content on line by line, but from the content's end (``data: [DONE]``, the final NDJSON
object, the receipt itself) it holds everything back until the body has ended, the receipt
was verified and nothing followed it; only then is the end handed out. A whole body's last
chunk is held the same way. So a reader that stops at ``[DONE]`` (the OpenAI SDK) never sees
a clean end of a reply whose receipt is missing, bad, padded past the bound, or followed by
more content: it gets the error instead.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from enclave.receipts import REFUSAL, REPLY, ReceiptTokenInvalid, unverified_claims
from paygate import jsonsafe, wire
from paygate.client.attestation import Attested, check_receipt
from paygate.client.errors import (
    ContentAfterReceipt,
    PaymentRefused,
    ReceiptInvalid,
    ReceiptMismatch,
    ReceiptMissing,
    RefusalUnauthenticated,
)
from paygate.client.payer import SentPayment
from paygate.client.streams import ReplyDecoder
from paygate.x402.inband import SSE_PREFIX as X402_SSE_PREFIX
from paygate.x402.pricing import token_charge
from paygate.x402.schemes import by_name
from paygate.x402.schemes.batch_settlement import channel as ch

SSE_PREFIX = b": paygate-receipt "
NDJSON_KEY = "paygate_receipt"
MAX_LINE = 1 << 20  # a line longer than this is passed on unread (never the receipt's)
MAX_TAIL_BYTES = 64 * 1024  # after the content's end: the receipts, nothing else
MAX_TAIL_SECONDS = 30.0  # from the content's end to the body's end (the transports)
_DONE = (b"data: [DONE]", b"data:[DONE]")
_OWN_LINE = b'{"' + NDJSON_KEY.encode() + b'":'


@dataclass
class SignedReceipt:
    """``response.extensions["paygate_receipt"]``: filled in when the reply has been read
    and its receipt verified."""

    claims: dict[str, Any] | None = None
    token: str | None = field(default=None, repr=False)


class ReceiptCheck:
    """Follows one reply's plaintext: :meth:`feed` returns what may be handed out now,
    :meth:`end` verifies (or raises) and returns the rest."""

    def __init__(
        self,
        attested: Attested,
        *,
        request_digest: str,
        header_token: str | None,
        content_type: str | None,
        payment: SentPayment | None,
        result: SignedReceipt,
        whole: bool = False,
        batch: bool = False,
        max_tail: int = MAX_TAIL_BYTES,
    ) -> None:
        self._attested = attested
        self._request_digest = request_digest
        self._header = header_token
        kind = wire.media_type(content_type)
        # A stream's receipt is in-band only: a header beside a stream is not looked at. A
        # reply sealed whole (v1) has its header whatever the plaintext is.
        self._kind = kind if kind in wire.STREAM_MEDIA_TYPES and not whole else ""
        self.payment = payment
        self._batch = batch
        self._result = result
        self._max_tail = max_tail
        self._hash = hashlib.sha256()
        self._at_line = self._hash.copy()
        self._line = bytearray()
        self._long = False  # the current line passed MAX_LINE: passed on unread
        self._last = b""  # a whole body's last chunk, held
        self._held = bytearray()  # from the content's end on
        self._holding = False
        self._tail = 0  # bytes held after the line that began the end
        self._token: str | None = None
        self.refusal: str | None = None  # a verified signed refusal's reason

    @property
    def in_tail(self) -> bool:
        """The content's end was seen: the rest must come soon (the transports' clock)."""
        return self._holding

    def feed(self, data: bytes) -> bytes:
        if not self._kind:
            self._hash.update(data)
            out, self._last = self._last, data
            return out
        out = bytearray()
        start = 0
        while start < len(data):
            cut = data.find(b"\n", start)
            end = len(data) if cut < 0 else cut + 1
            out += self._piece(data[start:end], complete=cut >= 0)
            start = end
        return bytes(out)

    def end(self) -> bytes:
        """The body ended cleanly: verify, and hand out what was held."""
        if not self._kind:
            digest = "sha256:" + self._hash.hexdigest()
            if self._header is None:
                raise ReceiptMissing("the reply carries no signed receipt")
            self._verify(self._header, digest)
            out, self._last = self._last, b""
            return out
        last = b""
        if self._line:
            rest = bytes(self._line)
            self._line = bytearray()
            last = rest if self._long else self._line_done(rest)
        if self._token is None:
            raise ReceiptMissing("the reply ended without its signed receipt")
        out, self._held = bytes(self._held), bytearray()
        return last + out

    # --- in-band ---------------------------------------------------------------------------

    def _piece(self, piece: bytes, *, complete: bool) -> bytes:
        if self._token is not None:
            if piece.strip():
                raise ContentAfterReceipt("the reply goes on after its signed receipt")
            return self._hold(piece)
        if not self._line and not self._long:
            self._at_line = self._hash.copy()
        self._hash.update(piece)
        if self._long:
            self._long = not complete
            return self._hold(piece) if self._holding else piece
        self._line += piece
        if len(self._line) > MAX_LINE:
            # Too long to be a receipt's line: passed on unread, as it comes.
            rest, self._line, self._long = bytes(self._line), bytearray(), not complete
            return self._hold(rest) if self._holding else rest
        if not complete:
            return b""
        line, self._line = bytes(self._line), bytearray()
        return self._line_done(line)

    def _line_done(self, line: bytes) -> bytes:
        """A whole line: passed on, or held from the content's end on."""
        kind, token = self._classify(line.rstrip(b"\r\n"))
        if kind is not None and not self._holding:
            self._holding = True
            self._held += line
            if token is not None:
                self._found(token, line)
            return b""
        out = self._hold(line)
        if token is not None:
            self._found(token, line)
        return out

    def _hold(self, data: bytes) -> bytes:
        if not self._holding:
            return data
        self._held += data
        self._tail += len(data)
        if self._tail > self._max_tail:
            raise ReceiptMissing(
                f"more than {self._max_tail} bytes after the reply's content without its receipt"
            )
        return b""

    def _classify(self, line: bytes) -> tuple[str | None, str | None]:
        """("end" | "receipt" | None, the receipt's token)."""
        if self._kind == wire.SSE:
            if line.startswith(SSE_PREFIX):
                return "receipt", line[len(SSE_PREFIX) :].decode("ascii", "replace")
            if line.startswith(_DONE) or line.startswith(X402_SSE_PREFIX):
                return "end", None
            return None, None
        if b'"done"' not in line and NDJSON_KEY.encode() not in line:
            return None, None
        try:
            value = jsonsafe.loads(line, max_bytes=MAX_LINE)
        except jsonsafe.UntrustedJSONError:
            return None, None
        if not isinstance(value, dict):
            return None, None
        token = value.get(NDJSON_KEY)
        if isinstance(token, str):
            return "receipt", token
        return ("end", None) if value.get("done") is True else (None, None)

    def _found(self, token: str, line: bytes) -> None:
        # The digest is fixed once the receipt is seen: verify now.
        self._token = token
        digest = self._at_line.copy()
        if self._kind == wire.NDJSON and not line.startswith(_OWN_LINE):
            # Joined to the upstream's final object: that line as it came is covered too.
            body = line.rstrip(b"\r\n")
            entry = json.dumps({NDJSON_KEY: token}, separators=(",", ":")).encode()[1:-1]
            for cut in (b"," + entry, entry):
                at = body.rfind(cut)
                if at >= 0:
                    digest.update(body[:at] + body[at + len(cut) :] + line[len(body) :])
                    break
            else:
                raise ReceiptMismatch("the signed receipt's entry is not where it belongs")
        self._verify(token, "sha256:" + digest.hexdigest())

    def _verify(self, token: str, digest: str) -> None:
        claims = check_receipt(
            self._attested, token, request_digest=self._request_digest, reply_digest=digest
        )
        kind = claims.get("kind")
        if kind == REFUSAL:
            # Its settlement refused for good: a refusal of this very payment, charging nothing
            # (enclave.receipts checks the form), bound like a reply's receipt.
            if self.payment is None:
                raise ReceiptMismatch("a signed refusal of a request that paid nothing")
            check_payment_identity(claims["payment"], self.payment)
            self.refusal = claims["reason"]
        elif kind != REPLY:
            raise ReceiptMismatch("the signed receipt is not a reply's")
        else:
            check_payment(claims, self.payment, batch=self._batch)
        self._result.claims = claims
        self._result.token = token

    def claims_refusal(self) -> bool:
        """Whether the signed receipt seen (verified or not) says it is a refusal."""
        if self._token is None:
            return False
        try:
            return unverified_claims(self._token).get("kind") == REFUSAL
        except ReceiptTokenInvalid:
            return False


def check_payment(
    claims: dict[str, Any], record: SentPayment | None, *, batch: bool = False
) -> None:
    """The receipt's payment is the one this client signed, charged what its usage costs at
    the prices offered, within the authorized maximum; :class:`ReceiptMismatch` otherwise.
    A batch is charged item by item (each rounded, each at least the minimum): its charge is
    checked against the maximum only."""
    payment = claims.get("payment")
    if record is None:
        if payment is not None:
            raise ReceiptMismatch("the signed receipt names a payment this request did not make")
        return
    if not isinstance(payment, dict):
        raise ReceiptMismatch("the signed receipt names no payment for a paid request")
    check_payment_identity(payment, record)
    charged = int(payment["charged"])
    settled = record.receipt
    if (
        settled is not None
        and settled.success
        and settled.amount
        and settled.amount != str(charged)
    ):
        raise ReceiptMismatch("the signed receipt's charge is not what the payment settled")
    scheme = by_name(record.scheme)
    if record.scheme == ch.NAME and payment.get("prices") is None:
        scheme = None  # a channel on a flat route: charged its price, as exact
    if scheme is None or not scheme.metered:
        if charged != record.amount_atomic:
            raise ReceiptMismatch("the signed receipt charges other than the exact price")
        return
    _check_metered_charge(claims, payment, record, charged, batch)


def check_payment_identity(payment: dict[str, Any], record: SentPayment) -> None:
    """The receipt's payment is the one this client signed (:class:`ReceiptMismatch`)."""
    expected = {
        "id": _payment_id(record),
        "scheme": record.scheme,
        "network": f"eip155:{record.chain_id}",
        "asset": record.asset.lower(),
        "pay_to": record.pay_to.lower(),
        "payer": record.payer.lower(),
        "authorized": str(record.amount_atomic),
    }
    for name, value in expected.items():
        stated = payment.get(name)
        if not isinstance(stated, str) or stated.lower() != value:
            label = "payment id" if name == "id" else name.replace("_", " ")
            raise ReceiptMismatch(f"the signed receipt's {label} is not this payment's")


def _payment_id(record: SentPayment) -> str:
    """The id the seller records a payment by: the authorization's nonce, or a channel
    payment's voucher id (its record's nonce is ``<channel id>:<cumulative ceiling>``)."""
    if record.scheme == ch.NAME:
        channel, _, ceiling = record.nonce.partition(":")
        try:
            return ch.voucher_id(channel, int(ceiling))
        except (ValueError, OverflowError):
            return record.nonce.lower()  # not ours: refused as another payment's
    return record.nonce.lower()


def _check_metered_charge(
    claims: dict[str, Any],
    payment: dict[str, Any],
    record: SentPayment,
    charged: int,
    batch: bool,
) -> None:
    usage = claims.get("usage")
    if not isinstance(usage, dict):
        raise ReceiptMismatch("the metered receipt states no usage")
    prices = _prices(payment.get("prices"))
    # The offered prices are the attested ones when an attestation policy is set: the payer
    # checked the offer against the attested payment terms before signing (client.terms). A
    # channel offer states none (its ceiling, held to the attested maximum, bounds the charge):
    # the charge must then be its usage at the receipt's own prices.
    offered = record.prices if record.scheme != ch.NAME else prices
    if prices is None or offered is None or prices != offered:
        raise ReceiptMismatch("the metered receipt's prices are not the ones offered")
    if batch:
        return  # charged <= authorized is checked with the form
    if usage.get("source") == "fallback-max":
        expected = record.amount_atomic  # no usage reported: the maximum, by configuration
    else:
        expected = token_charge(
            input_price=prices[0],
            output_price=prices[1],
            minimum=prices[2],
            tokens_in=usage["prompt_tokens"],
            tokens_out=usage["completion_tokens"],
            decimals=record.decimals,
            maximum=record.amount_atomic,
        )
        if record.scheme == ch.NAME:
            # A channel charges each request at least ch.LEAST_CHARGE (every voucher must
            # raise the cumulative), within the authorization, as the gateway does.
            expected = max(expected, min(ch.LEAST_CHARGE, record.amount_atomic))
    if charged != expected:
        raise ReceiptMismatch(
            f"the metered receipt charges {charged}, not {expected} for its usage at its prices"
        )


def _prices(value: Any) -> tuple[Decimal, Decimal, Decimal] | None:
    if not isinstance(value, dict):
        return None
    try:
        return (
            Decimal(str(value["input_per_million"])),
            Decimal(str(value["output_per_million"])),
            Decimal(str(value["minimum"])),
        )
    except (KeyError, InvalidOperation):
        return None


class CheckedDecoder:
    """A decoder whose plaintext a :class:`ReceiptCheck` watches and holds back at the end.

    A refusal at a stream's end (the x402 receipt's, or the signed one's) is raised as
    :class:`PaymentRefused` only once the appliance's signed refusal for this request, this
    payment and the bytes received has verified; a refusal without one, with a forged or
    unbound one, or beside a signed charge is :class:`RefusalUnauthenticated`."""

    def __init__(self, inner: ReplyDecoder, check: ReceiptCheck) -> None:
        self._inner = inner
        self._check = check
        self._payment = check.payment

    def feed(self, data: bytes) -> list[bytes]:
        chunks = self._inner.feed(data)
        try:
            out = [self._check.feed(chunk) for chunk in chunks]
        except ReceiptInvalid as exc:
            raise self._unauthenticated(exc) from None
        return [chunk for chunk in out if chunk]

    def end(self) -> list[bytes]:
        try:
            chunks = self._inner.end()
        except PaymentRefused:
            chunks = []  # the unsigned x402 receipt's word: held to the signed one below
        try:
            out = [self._check.feed(chunk) for chunk in chunks]
            out.append(self._check.end())
        except ReceiptInvalid as exc:
            raise self._unauthenticated(exc) from None
        if self._check.refusal is not None:
            if self._inner.refusal is None:
                # Its x402 receipt (covered by the signature) says settled or pending: the
                # outcome is not a refusal for good, and the payment may yet be charged.
                raise self._unauthenticated(
                    RefusalUnauthenticated(
                        "the appliance's signed refusal is not what the stream's x402 receipt"
                        " says (not refused for good)"
                    )
                )
            raise PaymentRefused(self._check.refusal)  # signed by the appliance: authentic
        if self._inner.refusal is not None:
            raise self._unauthenticated(
                RefusalUnauthenticated(
                    "the stream's x402 receipt says the payment was refused; the appliance's"
                    " signed receipt says it was charged"
                )
            )
        return [chunk for chunk in out if chunk]

    def _unauthenticated(self, exc: ReceiptInvalid) -> ReceiptInvalid:
        """A receipt defect where a refusal is claimed: the refusal is not authentic (and the
        payment's record says so). Bytes after the signed end stay what they are."""
        if not isinstance(exc, RefusalUnauthenticated):
            claimed = self._inner.refusal is not None or self._check.claims_refusal()
            if not claimed or isinstance(exc, ContentAfterReceipt):
                return exc
            exc = RefusalUnauthenticated(f"the stream's refusal is not authentic: {exc}")
        if self._payment is not None:
            self._payment.receipt_error = str(exc)
        return exc

    @property
    def wants_tail(self) -> bool:
        return False  # its end is never handed out before the receipt: nothing to collect

    @property
    def in_tail(self) -> bool:
        return self._check.in_tail

    @property
    def refusal(self) -> str | None:
        return self._check.refusal
