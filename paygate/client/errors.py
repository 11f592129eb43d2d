"""The client's exception family: one stable ``code`` per failure a caller may want to handle.

Messages are safe to log and show: they never carry wallet keys, signatures, payment headers,
request bodies or reply plaintext.
"""

from __future__ import annotations

from paygate.errors import PaygateError


class ClientError(PaygateError):
    """Base of every error raised by :mod:`paygate.client`."""

    message = "the paygate client failed"

    code = "client_error"


class PubkeyUnavailable(ClientError):
    """The appliance's public key could not be fetched or its document is not valid."""

    message = "the appliance's public key could not be fetched or its document is not valid"

    code = "pubkey_unavailable"


class PinMismatch(ClientError):
    """The appliance presented a key other than the pinned one: nothing was sealed to it."""

    message = "the appliance presented a key other than the pinned one"

    code = "pin_mismatch"


class AttestationFailed(ClientError):
    """The attestation hook refused the appliance's key: nothing was sealed to it."""

    message = "the attestation hook refused the appliance's key"

    code = "attestation_failed"


class ReplyOpenFailed(ClientError):
    """A sealed reply did not open: tampered, truncated, reordered or not meant for us.

    No plaintext of the failing part was handed out; chunks delivered before it were authentic.
    """

    message = "a sealed reply did not open (tampered, truncated, reordered or not for this client)"

    code = "reply_open_failed"


class ReplyNotSealed(ReplyOpenFailed):
    """A sealed request got a successful reply in the clear: refused as a possible downgrade."""

    message = "a sealed request got a successful reply in the clear"

    code = "reply_not_sealed"


class ReplyTooLarge(ClientError):
    """A reply the client must buffer (v1 blob, 402 challenge, key document) passed its bound."""

    message = "a reply the client must buffer passed its bound"

    code = "reply_too_large"


class RequestTooLarge(ClientError):
    """The request body passed the bound the client holds in memory to seal and re-send it."""

    message = "the request body passed the bound the client holds in memory to seal and re-send it"

    code = "request_too_large"


class InvalidChallenge(ClientError):
    """A 402 whose payment requirements cannot be read."""

    message = "the 402's payment requirements cannot be read"

    code = "invalid_challenge"


class SpendRefused(ClientError):
    """No offered payment requirement fits the spend policy; nothing was signed."""

    message = "no offered payment requirement fits the spend policy"

    code = "spend_refused"


class PayToNotAllowed(SpendRefused):
    """Every offer pays a wallet outside the spend policy's ``pay_to`` allow-list."""

    message = "every offer pays a wallet outside the spend policy's pay_to allow-list"

    code = "pay_to_not_allowed"


# --- offers held against the attested payment terms (docs/ATTESTATION.md "Paying the attested
# appliance"): each refusal has its own code and is raised before anything is signed.


class OfferNotAttested(SpendRefused):
    """The 402 asks for a payment outside the attested payment terms; nothing was signed."""

    message = "the 402 asks for a payment outside the attested payment terms"

    code = "offer_not_attested"


class PaymentNotAttested(OfferNotAttested):
    """A 402 from an appliance that was not attested, or attested as not charging."""

    message = "the 402 comes from an appliance not attested as charging"

    code = "payment_not_attested"


class OfferPayToMismatch(OfferNotAttested):
    message = "the offer pays a wallet other than the attested payTo"
    code = "offer_pay_to_mismatch"


class OfferNetworkMismatch(OfferNotAttested):
    message = "the offer's network is not the attested one"
    code = "offer_network_mismatch"


class OfferAssetMismatch(OfferNotAttested):
    """The token address, or its EIP-712 name/version, is not the attested one."""

    message = "the token address, or its EIP-712 name/version, is not the attested one"

    code = "offer_asset_mismatch"


class OfferSchemeMismatch(OfferNotAttested):
    message = "the offer's scheme is not one the attested terms offer"
    code = "offer_scheme_mismatch"


class OfferPriceMismatch(OfferNotAttested):
    """An exact offer's amount is not the attested price of this request."""

    message = "an exact offer's amount is not the attested price of this request"

    code = "offer_price_mismatch"


class OfferMaximumExceeded(OfferNotAttested):
    """An upto offer's maximum is above what the attested token prices and cap allow."""

    message = "an upto offer's maximum is above what the attested token prices and cap allow"

    code = "offer_maximum_exceeded"


class OfferTokenPriceMismatch(OfferNotAttested):
    """An upto offer's token prices are not the attested ones for the model."""

    message = "an upto offer's token prices are not the attested ones for the model"

    code = "offer_token_price_mismatch"


class OfferFacilitatorMismatch(OfferNotAttested):
    """An upto offer names a facilitator the terms do not."""

    message = "an upto offer names a facilitator the terms do not"

    code = "offer_facilitator_mismatch"


class OfferReceiverAuthorizerMismatch(OfferNotAttested):
    """A channel offer names a receiver authorizer (who signs claims and refunds) the attested
    channel terms do not."""

    message = "a channel offer's receiverAuthorizer is not the attested one"

    code = "offer_receiver_authorizer_mismatch"


class OfferWithdrawDelayMismatch(OfferNotAttested):
    """A channel offer's withdrawDelay (how long a deposit stays locked after a withdrawal
    request) is not the attested one."""

    message = "a channel offer's withdrawDelay is not the attested one"

    code = "offer_withdraw_delay_mismatch"


class OfferChannelContractMismatch(OfferNotAttested):
    """The attested channel terms name a settlement contract, deposit collector or deposit
    method other than the ones this client deposits into and signs for, or the offer's
    deposit method is not the attested one."""

    message = "the channel's contracts or deposit method are not the attested ones"

    code = "offer_channel_contract_mismatch"


class OfferChannelNotAttested(OfferNotAttested):
    """The appliance offers batch-settlement but its attested terms carry no channel terms
    (an older gateway), and the 402 offers nothing else to pay."""

    message = "the attested terms carry no channel terms: a channel offer cannot be checked"

    code = "offer_channel_not_attested"


class OfferTimeoutExceeded(OfferNotAttested):
    """An offer's maxTimeoutSeconds is longer than the attested one."""

    message = "an offer's maxTimeoutSeconds is longer than the attested one"

    code = "offer_timeout_exceeded"


class PaymentRefused(ClientError):
    """The server refused the signed payment; ``reason`` is the server's reason code."""

    message = "the server refused the signed payment"

    code = "payment_refused"

    def __init__(self, reason: str, *, status: int = 402) -> None:
        super().__init__(f"payment refused by the server: {reason}")
        self.reason = reason
        self.status = status


class ChannelStateRejected(ClientError):
    """A batch-settlement seller's channel state (a corrective 402, a receipt) is not one our
    own record allows: not signed by us, above the vouchers we signed, or older than the
    receipts we hold. Nothing more was signed."""

    message = "the seller's channel state was refused"

    code = "channel_state_rejected"


class ChannelStateInvalid(ClientError):
    """The transport's channel state file (``channel_state``) is tampered with, truncated,
    another wallet's or not a channel state: refused whole, nothing in it is used or signed
    on, and it is left in place. Move it aside to start afresh."""

    message = "the channel state file was refused"

    code = "channel_state_invalid"


class ChannelStateInUse(ClientError):
    """Another transport (in this process or another) holds the channel state file: two
    would sign vouchers on one channel from two counts."""

    message = "the channel state file is held by another transport"

    code = "channel_state_in_use"


class WalletKeyError(ClientError):
    """The wallet key file cannot be used (missing, unreadable by us, readable by others, or
    not a private key). The message never shows the key."""

    message = (
        "the wallet key file cannot be used (missing, unreadable, readable by others, or not a"
        " private key)"
    )

    code = "wallet_key_invalid"


# --- attestation (docs/ATTESTATION.md): each refusal has its own code; nothing was sealed or paid


class AttestationRefused(AttestationFailed):
    """The appliance's evidence did not satisfy the AttestationPolicy; nothing was sealed.

    ``checks`` lists every check run, in order (``enclave.attestation.base.Check``).
    """

    message = "the appliance's evidence did not satisfy the attestation policy"

    code = "attestation_failed"

    checks: tuple[object, ...] = ()  # set by the flow that refused


class KindNotAccepted(AttestationRefused):
    """TEE evidence of a kind the policy has no TeePolicy for."""

    message = "the policy accepts no evidence of this kind"

    code = "kind_not_accepted"


class EvidenceUnavailable(AttestationRefused):
    message = "the appliance's attestation evidence could not be fetched"
    code = "evidence_unavailable"


class EvidenceMalformed(AttestationRefused):
    message = "the attestation evidence is malformed"
    code = "evidence_malformed"


class EvidenceStale(AttestationRefused):
    message = "the attestation evidence is too old, or from the future"
    code = "evidence_stale"


class NonceMismatch(AttestationRefused):
    message = "the evidence is not for this nonce"
    code = "nonce_mismatch"


class Unattested(AttestationRefused):
    message = "the appliance offers no hardware attestation"
    code = "unattested"


class EkUntrusted(AttestationRefused):
    message = "the TPM's endorsement key does not chain to a trusted CA"
    code = "ek_untrusted"


class AkInvalid(AttestationRefused):
    message = "the attestation key is not a restricted, non-duplicable signing key"
    code = "ak_invalid"


class ActivationFailed(AttestationRefused):
    message = "the attestation key is not in the TPM of the certified EK"
    code = "activation_failed"


class QuoteInvalid(AttestationRefused):
    message = "the TPM quote does not verify or does not cover this binding document"
    code = "quote_invalid"


class PcrMismatch(AttestationRefused):
    message = "a PCR does not hold the value expected"
    code = "pcr_mismatch"


class KeyNotCertified(AttestationRefused):
    message = "a key is not the one the attestation key certified"
    code = "key_not_certified"


class ModelNotAccepted(AttestationRefused):
    message = "the model is not attested with a digest the policy accepts"
    code = "model_not_accepted"


class PayToMismatch(AttestationRefused):
    message = "the evidence names another payTo than the policy's"
    code = "pay_to_mismatch"


class CodeNotAccepted(AttestationRefused):
    """the gateway's code digest is not one the policy accepts (code_digests)"""

    message = "the gateway's code digest is not one the policy accepts"

    code = "code_not_accepted"


class GpuEvidenceMissing(AttestationRefused):
    """the policy requires GPU evidence and the appliance sent none"""

    message = "the policy requires GPU evidence and the appliance sent none"

    code = "gpu_evidence_missing"


class GpuEvidenceMismatch(AttestationRefused):
    """the GPU evidence is not the one the binding document names"""

    message = "the GPU evidence is not the one the binding document names"

    code = "gpu_evidence_mismatch"


class ReceiptInvalid(ClientError):
    """A reply's signed receipt is missing, malformed, not signed by the attested receipt key,
    or does not match the request or the reply received."""

    message = (
        "the reply's signed receipt is missing, malformed, not signed by the attested receipt"
        " key, or for another request or reply"
    )

    code = "receipt_invalid"


class ReceiptMismatch(ReceiptInvalid):
    """A signed receipt whose request, reply or model digest is not what this client saw."""

    message = "a signed receipt whose request, reply or model digest is not what this client saw"

    code = "receipt_mismatch"


class ReceiptMissing(ReceiptInvalid):
    """A reply ended (cleanly, by a reset, past the tail's bound of bytes or time) without its
    signed receipt: its end is not handed out."""

    message = "the reply ended without its signed receipt"

    code = "receipt_missing"


class ContentAfterReceipt(ReceiptInvalid):
    """Bytes came after a reply's signed receipt, which is the last thing an appliance sends."""

    message = "bytes came after the reply's signed receipt"

    code = "content_after_receipt"


class RefusalUnauthenticated(ReceiptInvalid):
    """A stream's end says its payment was refused, but no refusal signed by the attested
    receipt key, for this request, this payment and exactly the bytes received, backs it (the
    x402 receipt is unsigned: a path that rewrites a plain stream can forge it, strip the
    charge's signed receipt, or replay another request's refusal). Nothing says the payment
    was not charged: its maximum stays counted."""

    message = "the stream's refusal is not signed by the appliance for this request and reply"

    code = "refusal_unauthenticated"


# --- the transparency log (docs/TRANSPARENCY.md): refused before anything is sealed or paid


class LogInconsistent(AttestationRefused):
    """The appliance's log contradicts a checkpoint seen before: a fork (two roots for one
    size), a rewritten past, or a consistency proof that does not verify."""

    message = "the appliance's log contradicts a checkpoint seen before"

    code = "log_inconsistent"


class LogUnverified(AttestationRefused):
    """The log does not show what the policy requires: no checkpoint signed by the attested
    log key (or too few witness cosignatures), or no release / key-epoch entry for what was
    attested."""

    message = "the log does not show what the policy requires"

    code = "log_unverified"
