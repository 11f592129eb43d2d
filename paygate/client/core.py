"""What the transports do, once, without I/O: a request's flow as a generator of commands.

The flow yields :class:`Command` objects (read the request body, load the appliance key, write
the channel state, send, read a reply body, discard a reply) and the sync or async driver in
:mod:`transport` carries each out and sends the result back in. It ends by returning a
:class:`Deliver`: the response to hand to httpx, with the decoder its body must pass through.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
from eth_account.signers.local import LocalAccount

import enclave
from enclave import DecryptionError, ReplyKeys, SoftwareKey, p256, receipts, sealed_receipt
from enclave.envelope_v2 import request_nonce
from paygate import wire
from paygate.client.attestation import (
    AttestationPolicy,
    Attested,
    Exchange,
    check_model,
)
from paygate.client.channels import NAME as CHANNEL_SCHEME
from paygate.client.errors import (
    InvalidChallenge,
    OfferNotAttested,
    PaymentNotAttested,
    PaymentRefused,
    ReplyNotSealed,
    ReplyOpenFailed,
)
from paygate.client.payer import (
    MAX_CHALLENGE_BYTES,
    Payer,
    Payment,
    PaymentChallenge,
    SentPayment,
    SpendPolicy,
    X402Version,
    parse_challenge,
    refusal_reason,
)
from paygate.client.payment_log import PaymentLog, ReceiptCallback
from paygate.client.pubkey import EnclaveKey, KeyPin, parse_pubkey_document
from paygate.client.receipts import CheckedDecoder, ReceiptCheck, SignedReceipt
from paygate.client.streams import (
    PlainDecoder,
    ReplyDecoder,
    SealedDecoder,
)
from paygate.client.terms import check_challenge
from paygate.client.withheld import Withheld, resend_value
from paygate.wire import (
    ENVELOPE_HEADER,
    ORIGINAL_TYPE_HEADER,
    PUBKEY_PATH,
    REPLY_PUBKEY_HEADER,
    REQUEST_NONCE_HEADER,
)
from paygate.x402.batch import BATCH_PATH

Envelope = Literal["v2", "v1", "plain"]
# A request extension: a payment header (name, value) to send with the first attempt.
PRESET_PAYMENT = "paygate_payment"
DEFAULT_MAX_REQUEST_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_SEALED_REPLY_BYTES = 32 * 1024 * 1024
MAX_TAIL_BYTES = 64 * 1024  # read after the caller stops, to collect a pending receipt
_REQUEST_HEADERS_DROPPED = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "x-obol-reply-pubkey",
        "payment-signature",
        "x-payment",
        "x-paygate-request-nonce",
        "x-paygate-key-id",
    }
)
_SEALED_REPLY_HEADERS_DROPPED = frozenset(
    {
        "content-type",
        "content-length",
        "content-encoding",
        "transfer-encoding",
        "x-paygate-content-type",
    }
)


# --- commands ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """Read the request body (at most ``limit`` bytes) → bytes."""

    request: httpx.Request
    limit: int


@dataclass(frozen=True, slots=True)
class LoadKey:
    """The key of ``origin``: cached, or fetched, pinned and attested → EnclaveKey."""

    origin: str
    request: httpx.Request


@dataclass(frozen=True, slots=True)
class Send:
    """Send through the wrapped transport → httpx.Response (body unread)."""

    request: httpx.Request


@dataclass(frozen=True, slots=True)
class ReadBody:
    """Read a reply body (at most ``limit`` bytes) and close it → bytes."""

    response: httpx.Response
    limit: int
    what: str


@dataclass(frozen=True, slots=True)
class Discard:
    """Close a reply without reading it → None."""

    response: httpx.Response


@dataclass(frozen=True, slots=True)
class SaveChannels:
    """Write the channel state before a channel payment is sent → None. Blocking (fsyncs):
    the async transport runs it in a worker thread. Raising (SpendRefused) refuses the
    payment, rolled back, with nothing sent."""

    save: Callable[[], None]


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep ``seconds`` (a withheld reply's Retry-After, bounded) → None."""

    seconds: float


Command = ReadRequest | LoadKey | Send | ReadBody | Discard | SaveChannels | Wait


@dataclass(frozen=True, slots=True)
class Deliver:
    """The response for httpx: a streamed ``source`` through ``decoder``, or whole ``content``."""

    status: int
    headers: list[tuple[str, str]]
    extensions: dict[str, Any]
    source: httpx.Response | None = None
    decoder: ReplyDecoder | None = None
    content: bytes = b""


Flow = Generator[Command, Any, Deliver]


@dataclass(frozen=True, slots=True)
class ReplyInfo:
    """What the transport did for one response: ``response.extensions["paygate"]``.

    ``payment`` is live: a streamed reply's receipt lands in it when the stream ends.
    """

    envelope: Envelope
    key_fingerprint: str | None
    payment: SentPayment | None


@dataclass(frozen=True, slots=True)
class _Attempt:
    request: httpx.Request
    envelope: Envelope
    key: EnclaveKey | None
    v2_reply: ReplyKeys | None = field(default=None, repr=False)
    v1_reply: SoftwareKey | None = field(default=None, repr=False)
    # What a signed receipt must name this request by (enclave.receipts.request_digest).
    request_digest: str = ""


def origin_of(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port is not None else ""
    return f"{url.scheme}://{url.host}{port}"


class ClientCore:
    """Configuration and state shared by one transport's requests: the key cache, the payer,
    the payment log (:class:`PaymentLog`)."""

    def __init__(
        self,
        *,
        envelope: Envelope,
        pin: str | bytes | None,
        wallet: LocalAccount | None,
        spend: SpendPolicy | None,
        x402_version: X402Version | None,
        pubkey_url: str | None,
        on_receipt: ReceiptCallback | None,
        max_request_bytes: int,
        max_sealed_reply_bytes: int,
        attestation: AttestationPolicy | None = None,
        channel_state: str | os.PathLike[str] | None = None,
        withheld: Withheld | None = None,
    ) -> None:
        if envelope not in ("v2", "v1", "plain"):
            raise ValueError("envelope must be 'v2', 'v1' or 'plain'")
        if wallet is not None and spend is None:
            raise ValueError("a wallet needs a SpendPolicy: nothing is paid without limits")
        if x402_version not in (None, 1, 2):
            raise ValueError("x402_version must be 1, 2 or None")
        self.envelope: Envelope = envelope
        self.pin = KeyPin(pin) if pin is not None else None
        if channel_state is not None and wallet is None:
            raise ValueError("channel_state keeps a wallet's channels: there is no wallet")
        self.payer = (
            Payer(wallet, spend, channel_state)
            if wallet is not None and spend is not None
            else None
        )
        self.x402_version = x402_version
        self.pubkey_url = httpx.URL(pubkey_url) if pubkey_url else None
        self.max_request_bytes = max_request_bytes
        self.max_sealed_reply_bytes = max_sealed_reply_bytes
        self._keys: dict[str, EnclaveKey] = {}
        self.attestation = attestation
        self._attested: dict[str, Attested] = {}
        self.payments = PaymentLog(self.payer, on_receipt)
        self.withheld = withheld if withheld is not None else Withheld()
        self._lock = threading.Lock()

    # --- keys ------------------------------------------------------------------------------

    def cached_key(self, origin: str) -> EnclaveKey | None:
        with self._lock:
            return self._keys.get(origin)

    def attested(self, origin: str) -> Attested | None:
        with self._lock:
            return self._attested.get(origin)

    def store_key(self, key: EnclaveKey, attested: Attested | None) -> None:
        """Cache an accepted key (pinned, attested, let through by the hook) and what
        attested it: both are used from now on, neither before."""
        with self._lock:
            self._keys[key.origin] = key
            if attested is not None:
                self._attested[key.origin] = attested

    def forget_keys(self) -> None:
        with self._lock:
            self._keys.clear()
            self._attested.clear()

    def forget_origin(self, origin: str, stale: EnclaveKey | None = None) -> None:
        """Drop one origin's key and attestation (its key epoch is gone): fetch and attest
        again on the next request. With ``stale``, only if that is still the cached key (a
        concurrent request may have renewed it already)."""
        with self._lock:
            cached = self._keys.get(origin)
            if stale is not None and cached is not None and cached != stale:
                return
            self._keys.pop(origin, None)
            self._attested.pop(origin, None)

    # --- attestation -----------------------------------------------------------------------

    def exchange_request(
        self, exchange: Exchange, original: httpx.Request, key: EnclaveKey | None = None
    ) -> httpx.Request:
        timeout = original.extensions.get("timeout")
        headers = {"Accept": "application/json"}
        if exchange.body is not None:
            headers["Content-Type"] = "application/json"
        if key is not None and key.key_id is not None:
            # Behind a load balancer that routes by key: the replica that holds this key
            # answers the attestation (and its activation), not a sibling.
            headers[wire.KEY_ID_HEADER] = key.key_id
        return httpx.Request(
            exchange.method,
            exchange.url,
            headers=headers,
            content=exchange.body,
            extensions={"timeout": timeout} if timeout is not None else {},
        )

    def _check_model(self, origin: str, body: bytes) -> None:
        policy = self.attestation
        attested = self.attested(origin)
        if policy is None or attested is None or not policy.model_digests:
            return
        check_model(attested, policy, model_of(body))

    def _check_challenge(
        self, request: httpx.Request, body: bytes, challenge: PaymentChallenge
    ) -> PaymentChallenge:
        attested = self.attested(origin_of(request.url))
        if attested is None:
            raise PaymentNotAttested("a 402 before the appliance was attested (nothing signed)")
        return check_challenge(
            challenge,
            attested.binding.payment,
            method=request.method,
            path=request.url.path,
            body=body,
        )

    def key_request(self, command: LoadKey) -> httpx.Request:
        url = self.pubkey_url or httpx.URL(command.origin + PUBKEY_PATH)
        timeout = command.request.extensions.get("timeout")
        return httpx.Request(
            "GET",
            url,
            headers={"Accept": "application/json"},
            extensions={"timeout": timeout} if timeout is not None else {},
        )

    def attested_key(self, key: EnclaveKey, attested: Attested) -> EnclaveKey:
        """The key to seal to once attested: with key epochs the evidence's current epoch (it
        may be newer than the key document's), named by its key id."""
        if not attested.binding.epochs:
            return key
        current = attested.binding.epochs[0]
        return dataclasses.replace(
            key,
            public_key=current.sealing_key,
            fingerprint=p256.fingerprint(current.sealing_key),
            key_id=current.id,
        )

    def accept_key(self, origin: str, status: int, body: bytes) -> EnclaveKey:
        """Parse a fetched key document and check the pin (not yet cached: attest first)."""
        key = parse_pubkey_document(origin, status, body)
        if self.pin is not None:
            self.pin.check(key)
        return key

    # --- the flow --------------------------------------------------------------------------

    def flow(self, request: httpx.Request) -> Flow:
        """One request: seal, send, pay once if asked to, open."""
        body = yield ReadRequest(request, self.max_request_bytes)
        local = wire.is_local(request.url.path)
        preset: tuple[str, str] | None = request.extensions.get(PRESET_PAYMENT)
        # A refund carries nothing but its payment: it goes unsealed.
        envelope: Envelope = "plain" if local or preset is not None else self.envelope
        key: EnclaveKey | None = None
        if envelope != "plain" or (self.attestation is not None and not local):
            # With a policy even a plaintext request waits for attestation: its reply's
            # signed receipt is checked against the attested key.
            key = yield LoadKey(origin_of(request.url), request)
            self._check_model(origin_of(request.url), body)
        # A payment made beforehand (a channel refund: paygate.client.refunds) rides along.
        attempt = seal_attempt(request, body, envelope, key, preset)
        response = yield Send(attempt.request)
        retried = False
        if key is not None and _stale_key(response):
            # The key epoch is retired, or this replica does not hold the key (it died, or the
            # balancer moved us): fetch and attest again, once, and re-seal. Nothing was paid.
            retried = True
            yield Discard(response)
            key = yield from self._renew_key(request, body, key)
            attempt = seal_attempt(request, body, envelope, key, None)
            response = yield Send(attempt.request)
        record: SentPayment | None = None
        if response.status_code == 402 and self.payer is not None and preset is None:
            challenge_body = yield ReadBody(response, MAX_CHALLENGE_BYTES, "the 402 challenge")
            challenge = parse_challenge(response.headers, challenge_body, version=self.x402_version)
            if self.attestation is not None:
                # Before anything is signed: only the attested appliance's own terms are paid.
                challenge = self._check_challenge(request, body, challenge)
            url = str(request.url.copy_with(query=None, fragment=None))
            payment = self.payer.pay(challenge, url=url, write=False)
            if payment.save is not None:
                yield SaveChannels(payment.save)
            record = payment.record
            self.payments.append(record)
            sent = (payment.header, payment.value)
            # Re-sealed: a fresh reply key for every attempt, never one reused.
            attempt, response = yield from send_paid(
                lambda: seal_attempt(request, body, envelope, key, sent), record
            )
            if key is not None and not retried and _stale_key(response):
                # Retired between the 402 and now: the payment was not taken (the gateway
                # refuses a stale key before the payment is settled); send it again re-sealed.
                yield Discard(response)
                key = yield from self._renew_key(request, body, key)
                attempt = seal_attempt(request, body, envelope, key, sent)
                response = yield Send(attempt.request)
            attempt, response = yield from self._withheld(
                lambda paid: seal_attempt(request, body, envelope, key, paid),
                sent,
                record,
                (attempt, response),
            )
            if response.status_code == 402:
                refusal = yield ReadBody(response, MAX_CHALLENGE_BYTES, "the 402 refusal")
                self.payments.header_receipt(record, response.headers)
                again = self._resync(record, response.headers, refusal, (request, body))
                if again is not None:
                    # A channel's corrective 402, checked against our own record: pay once
                    # more on the seller's state.
                    if again.save is not None:
                        yield SaveChannels(again.save)
                    record = again.record
                    self.payments.append(record)
                    attempt = seal_attempt(
                        request, body, envelope, key, (again.header, again.value)
                    )
                    response = yield Send(attempt.request)
                    attempt, response = yield from self._withheld(
                        lambda paid: seal_attempt(request, body, envelope, key, paid),
                        (again.header, again.value),
                        record,
                        (attempt, response),
                    )
                if response.status_code == 402:
                    if again is not None:
                        refusal = yield ReadBody(response, MAX_CHALLENGE_BYTES, "the 402 refusal")
                        self.payments.header_receipt(record, response.headers)
                    self.payer.channel_ended(record)
                    raise PaymentRefused(refusal_reason(response.headers, refusal))
        return (yield from self._reply(attempt, response, record))

    def _withheld(
        self,
        make: Callable[[tuple[str, str]], _Attempt],
        sent: tuple[str, str],
        record: SentPayment,
        answered: tuple[_Attempt, httpx.Response],
    ) -> Generator[Command, Any, tuple[_Attempt, httpx.Response]]:
        """A paid reply the gateway withheld (503 ``lease_lost`` / ``ledger_unavailable``: its
        charge not recorded, the payment released) sent again with the same payment, re-sealed,
        after its Retry-After, within :class:`Withheld`'s bounds; else the answer as it came.
        Nothing new is signed, so nothing more counts against ``max_total``."""
        attempt, response = answered
        while (wait := self.withheld.delay(response, record.withheld)) is not None:
            yield Discard(response)
            if wait > 0:
                yield Wait(wait)
            record.withheld += 1
            paid = (sent[0], resend_value(sent[1], record.scheme))
            attempt, response = yield from send_paid(functools.partial(make, paid), record)
        return attempt, response

    def _resync(
        self,
        record: SentPayment,
        headers: httpx.Headers,
        body: bytes,
        sent: tuple[httpx.Request, bytes],
    ) -> Payment | None:
        assert self.payer is not None
        if record.scheme != CHANNEL_SCHEME:
            return None
        request, request_body = sent
        try:
            challenge = parse_challenge(headers, body, version=2)
            if self.attestation is not None:
                # The corrective 402 names the next voucher's price: held to the attested
                # terms like the first 402, before anything more is signed.
                challenge = self._check_challenge(request, request_body, challenge)
        except InvalidChallenge:
            self.payer.channel_ended(record)
            return None
        except OfferNotAttested:
            self.payer.channel_ended(record)
            raise
        url = str(request.url.copy_with(query=None, fragment=None))
        return self.payer.resync(record, challenge, url=url, write=False)

    def _renew_key(
        self, request: httpx.Request, body: bytes, stale: EnclaveKey
    ) -> Generator[Command, Any, EnclaveKey]:
        origin = origin_of(request.url)
        self.forget_origin(origin, stale)
        key: EnclaveKey = yield LoadKey(origin, request)
        self._check_model(origin, body)
        return key

    def _reply(
        self, attempt: _Attempt, response: httpx.Response, record: SentPayment | None
    ) -> Generator[Command, Any, Deliver]:
        sealed = wire.is_sealed(response.headers.get("content-type"))
        header = response.headers.get(wire.RECEIPT_HEADER)
        # A sealed reply's receipt header is sealed to this request's reply key.
        token = _open_receipt_header(attempt, header) if sealed and header else header
        if record is not None:
            self.payments.header_receipt(record, response.headers, token if sealed else None)
            if response.status_code >= 400 and record.receipt is None:
                self.payer_ended(record)
        info = ReplyInfo(
            envelope=attempt.envelope if sealed else "plain",
            key_fingerprint=attempt.key.fingerprint if attempt.key else None,
            payment=record,
        )
        extensions = {**response.extensions, "paygate": info}
        receipt = self._receipt_check(attempt, response, sealed, record, extensions, token)
        if attempt.envelope == "plain" or (not sealed and response.status_code >= 400):
            # In the clear: no sealing asked, or a gateway error (402/4xx/5xx before opening).
            content_type = response.headers.get("content-type")
            scanner = self.payments.scanner(content_type, record)
            plain: ReplyDecoder = PlainDecoder(scanner)
            if receipt is not None:
                plain = CheckedDecoder(plain, receipt(content_type))
            return Deliver(
                response.status_code,
                response.headers.multi_items(),
                extensions,
                source=response,
                decoder=plain,
            )
        if not sealed:
            yield Discard(response)
            raise ReplyNotSealed(
                f"HTTP {response.status_code} came back in the clear to a sealed request"
            )
        stated = response.headers.get(ENVELOPE_HEADER)
        if stated is not None and stated.strip().lower() != attempt.envelope:
            yield Discard(response)
            raise ReplyOpenFailed(
                f"the reply claims envelope {stated.strip()[:8]!r}; the request was "
                f"{attempt.envelope}"
            )
        plain_type = response.headers.get(ORIGINAL_TYPE_HEADER)
        headers = [
            (name, value)
            for name, value in response.headers.multi_items()
            if name.lower() not in _SEALED_REPLY_HEADERS_DROPPED
        ]
        if attempt.envelope == "v2":
            assert attempt.v2_reply is not None
            plain_type = plain_type or "application/octet-stream"
            headers.append(("Content-Type", plain_type))
            decoder: ReplyDecoder = SealedDecoder(
                attempt.v2_reply, self.payments.scanner(plain_type, record)
            )
            if receipt is not None:
                decoder = CheckedDecoder(decoder, receipt(plain_type))
            return Deliver(response.status_code, headers, extensions, response, decoder)
        assert attempt.v1_reply is not None
        blob = yield ReadBody(response, self.max_sealed_reply_bytes, "the sealed v1 reply")
        try:
            plaintext = enclave.open_v1(attempt.v1_reply, blob)
        except DecryptionError:
            raise ReplyOpenFailed("the sealed v1 reply failed to open") from None
        # Obol's gateway does not say what the plaintext is; its APIs speak JSON or SSE.
        plain_type = plain_type or _sniff(plaintext)
        headers.append(("Content-Type", plain_type))
        scanner = self.payments.scanner(plain_type, record)
        if scanner is not None:
            scanner.feed(plaintext)
            scanner.finish()
        if receipt is not None:
            check = receipt(plain_type)
            check.feed(plaintext)
            check.end()
        return Deliver(response.status_code, headers, extensions, content=plaintext)

    def _receipt_check(
        self,
        attempt: _Attempt,
        response: httpx.Response,
        sealed: bool,
        record: SentPayment | None,
        extensions: dict[str, Any],
        token: str | None,
    ) -> Callable[[str | None], ReceiptCheck] | None:
        """With an attested origin, every paid or sealed reply below 400 must carry a receipt
        signed by the attested key, for this request and payment: a factory of its check, or
        None."""
        attested = self.attested(origin_of(attempt.request.url))
        if attested is None or response.status_code >= 400 or not (sealed or record):
            return None
        signed = SignedReceipt()
        extensions["paygate_receipt"] = signed
        self.payments.keep_signed(signed)

        def make(content_type: str | None) -> ReceiptCheck:
            return ReceiptCheck(
                attested,
                request_digest=attempt.request_digest,
                header_token=token,
                content_type=content_type,
                payment=record,
                result=signed,
                whole=sealed and attempt.envelope == "v1",
                batch=attempt.request.url.path == BATCH_PATH,
            )

        return make

    def payer_ended(self, record: SentPayment) -> None:
        if self.payer is not None:
            self.payer.channel_ended(record)

    def close(self) -> None:
        """Let go of what the transport holds beyond connections (the channel state file)."""
        if self.payer is not None:
            self.payer.close()


def seal_attempt(
    request: httpx.Request,
    body: bytes,
    envelope: Envelope,
    key: EnclaveKey | None,
    payment: tuple[str, str] | None,
) -> _Attempt:
    """The request as sent: sealed to ``key`` (v1/v2) with a fresh reply key and nonce, the
    payment header when paying, and the digest its signed receipt must name."""
    headers = httpx.Headers(
        [
            (name, value)
            for name, value in request.headers.multi_items()
            if name.lower() not in _REQUEST_HEADERS_DROPPED
        ]
    )
    v2_reply: ReplyKeys | None = None
    v1_reply: SoftwareKey | None = None
    content = body
    # A fresh nonce for every attempt: no old reply's receipt names this request. v2
    # derives it from the reply secret inside the seal; otherwise it is a header.
    nonce: bytes | None = None
    if envelope == "v2":
        assert key is not None
        sealed = enclave.seal_v2(
            key.public_key,
            body,
            method=request.method,
            path=request.url.path,
            key_id=key.key_id,
        )
        content, v2_reply = sealed.blob, sealed.reply
        headers["Content-Type"] = enclave.CONTENT_TYPE
        nonce = request_nonce(v2_reply)
    else:
        nonce = os.urandom(receipts.NONCE_LEN)
        headers[REQUEST_NONCE_HEADER] = nonce.hex()
    if envelope == "v1":
        assert key is not None
        v1_reply = SoftwareKey.generate()
        headers[REPLY_PUBKEY_HEADER] = v1_reply.public_key.hex()
        if body:
            content = enclave.seal_v1(key.public_key, body)
            headers["Content-Type"] = enclave.CONTENT_TYPE
    digest = receipts.request_digest(
        method=request.method,
        path=request.url.path,
        body=content,
        nonce=nonce,
        reply_key=v1_reply.public_key if v1_reply is not None else None,
    )
    if payment is not None:
        headers[payment[0]] = payment[1]
    if key is not None and key.key_id is not None:
        headers[wire.KEY_ID_HEADER] = key.key_id  # what a balancer routes on
    outgoing = httpx.Request(
        request.method,
        request.url,
        headers=headers,
        content=content,
        extensions=request.extensions,
    )
    return _Attempt(outgoing, envelope, key, v2_reply, v1_reply, digest)


# A paid request whose connection dropped before its reply is sent again, charged once.
#
# The payment carries x402's ``payment-identifier`` (the transport names every v2 payment when the
# server declares the extension): the server answers a second request with the same identifier
# from the first one's record — served (409 ``payment_already_served`` with its receipt), still in
# flight (409 ``payment_in_progress``), or, when nothing was taken, by serving it as new — never
# by charging again. So only such a payment is re-sent, and only unchanged: the same payment
# header (the same authorization, the same identifier) and the same body, re-sealed with a fresh
# reply key; at most MAX_PAID_RETRIES times, and only after a connection error before any reply
# (a timeout is not retried: the first attempt may still be running).
MAX_PAID_RETRIES = 2
# The connection failed before a reply: refused, reset, closed without an answer.
DROPPED = (httpx.NetworkError, httpx.RemoteProtocolError)


def send_paid(
    make: Callable[[], _Attempt], record: SentPayment
) -> Generator[Send, Any, tuple[_Attempt, httpx.Response]]:
    """Send the paid attempt ``make`` builds; re-send it when its connection drops and the
    payment has an identifier (the driver throws the transport's error into the flow)."""
    tries = 0
    while True:
        attempt = make()
        try:
            response: httpx.Response = yield Send(attempt.request)
        except DROPPED:
            if record.identifier is None or tries >= MAX_PAID_RETRIES:
                raise
            tries += 1
            record.retries = tries
            continue
        return attempt, response


def _open_receipt_header(attempt: _Attempt, value: str) -> str | None:
    """A sealed reply's receipt header opened with this request's reply key (None: it does
    not open, which the receipt check then reports as a missing receipt)."""
    try:
        if attempt.v2_reply is not None:
            return sealed_receipt.open_v2(attempt.v2_reply, value)
        if attempt.v1_reply is not None:
            return sealed_receipt.open_v1(attempt.v1_reply, value)
    except DecryptionError:
        return None
    return None


_STALE_KEY_CODES = frozenset({"key_epoch_retired", "wrong_replica"})


def _stale_key(response: httpx.Response) -> bool:
    """The gateway says the key this request was sealed to is not (or no longer) served."""
    return (
        response.status_code in (410, 421)
        and response.headers.get(wire.ERROR_HEADER, "") in _STALE_KEY_CODES
    )


def model_of(body: bytes) -> str | None:
    """The ``model`` a JSON request body asks for, if any (bounded: never the whole body)."""
    if not body or len(body) > DEFAULT_MAX_REQUEST_BYTES or body.lstrip()[:1] != b"{":
        return None
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    model = value.get("model") if isinstance(value, dict) else None
    return model if isinstance(model, str) else None


def _sniff(plaintext: bytes) -> str:
    head = plaintext[:64].lstrip()
    if head.startswith((b"data:", b"event:", b":")):
        return "text/event-stream"
    return "application/json" if head.startswith((b"{", b"[")) else "application/octet-stream"
