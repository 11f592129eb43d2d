"""Reply bodies on the client: v2 frames opened as they come, the in-band receipt found in any
chunking. The receipts are written by the gateway's own writer (paygate.x402.inband)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave import SoftwareKey, seal_v2
from paygate.client import PaymentRefused, ReplyOpenFailed
from paygate.client.streams import (
    MAX_SCANNED_LINE,
    NDJSON,
    SSE,
    PlainDecoder,
    ReceiptScanner,
    SealedDecoder,
)
from paygate.x402 import codec
from paygate.x402.inband import InbandReceiptWriter
from paygate.x402.models import SettleResponse

RECEIPT = SettleResponse(success=True, transaction="0x" + "ab" * 32, network="eip155:84532")
SSE_EVENTS = [b'data: {"n": %d}\n\n' % i for i in range(5)] + [b"data: [DONE]\n\n"]
NDJSON_LINES = [json.dumps({"n": i, "done": False}).encode() + b"\n" for i in range(5)] + [
    json.dumps({"done": True, "eval_count": 5}).encode() + b"\n"
]


def _with_receipt(media_type: str, chunks: list[bytes]) -> bytes:
    writer = InbandReceiptWriter(media_type)
    out = b"".join(writer.feed(chunk) for chunk in chunks)
    return out + writer.close(codec.encode(RECEIPT))


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


class Sink:
    def __init__(self) -> None:
        self.receipts: list[SettleResponse | None] = []
        self.errors: list[str | None] = []

    def __call__(self, receipt: SettleResponse | None, error: str | None) -> None:
        self.receipts.append(receipt)
        self.errors.append(error)


@settings(max_examples=200, deadline=None)
@given(media=st.sampled_from([SSE, NDJSON]), cuts=st.lists(st.integers(0, 10_000), max_size=12))
def test_receipt_is_found_in_any_chunking(media: str, cuts: list[int]) -> None:
    data = _with_receipt(media, SSE_EVENTS if media == SSE else NDJSON_LINES)
    sink = Sink()
    scanner = ReceiptScanner(f"{media}; charset=utf-8", sink)
    decoder = PlainDecoder(scanner)
    out = b"".join(piece for chunk in _split(data, cuts) for piece in decoder.feed(chunk))
    decoder.end()
    assert out == data  # passed through unchanged
    assert sink.receipts == [RECEIPT]
    assert scanner.content_ended


def test_no_receipt_means_no_call_and_content_end_is_noticed() -> None:
    sink = Sink()
    scanner = ReceiptScanner(SSE, sink)
    for event in SSE_EVENTS:
        scanner.feed(event)
    scanner.finish()
    assert sink.receipts == []
    assert scanner.content_ended
    assert not scanner.found


def test_an_unreadable_receipt_is_reported_not_raised() -> None:
    sink = Sink()
    scanner = ReceiptScanner(SSE, sink)
    scanner.feed(b"data: [DONE]\n\n: x402-payment-response not-base64!\n\n")
    assert sink.receipts == [None]
    assert "not base64" in (sink.errors[0] or "")


def test_overlong_lines_are_skipped_and_scanning_goes_on() -> None:
    sink = Sink()
    scanner = ReceiptScanner(NDJSON, sink)
    scanner.feed(b'{"pad": "' + b"x" * (MAX_SCANNED_LINE + 10))
    scanner.feed(b'"}\n')
    scanner.feed(_with_receipt(NDJSON, NDJSON_LINES[-1:]))
    assert sink.receipts == [RECEIPT]


def test_last_line_without_newline_still_counts() -> None:
    sink = Sink()
    scanner = ReceiptScanner(NDJSON, sink)
    scanner.feed(_with_receipt(NDJSON, NDJSON_LINES).rstrip(b"\n"))
    assert sink.receipts == []
    scanner.finish()
    assert sink.receipts == [RECEIPT]


def test_other_media_types_are_not_scanned() -> None:
    assert not ReceiptScanner("application/json", Sink()).active


def _sealed(chunks: list[bytes]) -> tuple[bytes, object]:
    request = seal_v2(SoftwareKey.generate().public_key, b"{}", method="POST", path="/x")
    sealer = request.reply.sealer()
    body = b"".join(sealer.seal(chunk) for chunk in chunks) + sealer.finish()
    return body, request.reply


@settings(max_examples=100, deadline=None)
@given(cuts=st.lists(st.integers(0, 10_000), max_size=10))
def test_sealed_stream_opens_in_any_chunking_with_its_receipt(cuts: list[int]) -> None:
    plaintext = _with_receipt(SSE, SSE_EVENTS)
    body, keys = _sealed([plaintext[:40], plaintext[40:]])
    sink = Sink()
    decoder = SealedDecoder(keys, ReceiptScanner(SSE, sink))  # type: ignore[arg-type]
    out = b"".join(piece for chunk in _split(body, cuts) for piece in decoder.feed(chunk))
    out += b"".join(decoder.end())
    assert out == plaintext
    assert sink.receipts == [RECEIPT]


def test_sealed_stream_defects_raise_the_client_error() -> None:
    body, keys = _sealed([b"one", b"two"])
    flipped = bytearray(body)
    flipped[40] ^= 1
    with pytest.raises(ReplyOpenFailed, match="failed to open"):
        SealedDecoder(keys, None).feed(bytes(flipped))  # type: ignore[arg-type]
    truncated = SealedDecoder(keys, None)  # type: ignore[arg-type]
    assert truncated.feed(body[:-20]) == [b"one", b"two"]
    with pytest.raises(ReplyOpenFailed, match="final frame"):
        truncated.end()


def test_tail_is_wanted_only_between_content_end_and_receipt() -> None:
    decoder = PlainDecoder(ReceiptScanner(SSE, Sink()))
    decoder.feed(SSE_EVENTS[0])
    assert not decoder.wants_tail
    decoder.feed(SSE_EVENTS[-1])
    assert decoder.wants_tail
    decoder.feed(b": x402-payment-response " + codec.encode(RECEIPT).encode() + b"\n\n")
    assert not decoder.wants_tail
    assert not PlainDecoder(None).wants_tail


@pytest.mark.parametrize("media", [SSE, NDJSON])
@pytest.mark.parametrize(
    ("reason", "refused"),
    [("invalid_exact_evm_insufficient_balance", True), ("settlement_pending", False)],
)
def test_a_stream_whose_settlement_was_refused_raises_at_its_end(
    media: str, reason: str, refused: bool
) -> None:
    """The content is handed out; the end raises the refusal (a pending settlement ends
    cleanly: it settles later)."""
    failed = SettleResponse(success=False, error_reason=reason, transaction="", network="eip155:1")
    writer = InbandReceiptWriter(media)
    chunks = SSE_EVENTS if media == SSE else NDJSON_LINES
    data = b"".join(writer.feed(chunk) for chunk in chunks) + writer.close(codec.encode(failed))
    sink = Sink()
    decoder = PlainDecoder(ReceiptScanner(media, sink))
    assert b"".join(decoder.feed(data)) == data
    if refused:
        with pytest.raises(PaymentRefused) as raised:
            decoder.end()
        assert raised.value.reason == reason
    else:
        assert decoder.end() == []
    assert sink.receipts == [failed]
