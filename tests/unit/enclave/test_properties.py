"""Property tests: no byte string makes an opener raise anything but the uniform error."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from enclave import DecryptionError, ReplyKeys, SoftwareKey, open_v1, open_v2, seal_v1, seal_v2

KEY = SoftwareKey.from_private_bytes(b"\x11" * 32)
V1 = seal_v1(KEY.public_key, b"known plaintext")
V2 = seal_v2(KEY.public_key, b"known plaintext", method="POST", path="/v1/completions")
_SEALER = V2.reply.sealer()
REPLY = _SEALER.seal(b"a") + _SEALER.finish(b"b")
UNIFORM = "uniform error"


def _outcome(call: Callable[[], bytes]) -> bytes | str:
    """The plaintext, or UNIFORM when the uniform error was raised (any other error propagates)."""
    try:
        return call()
    except DecryptionError as exc:
        error = exc
    assert (str(error), error.code) == ("decryption failed", "decryption_failed")
    return UNIFORM


def _mutations() -> st.SearchStrategy[bytes]:
    """Random bytes, plus valid blobs with random edits (reaching the deeper checks)."""

    def mutate(blob: bytes, data: st.DataObject) -> bytes:
        out = bytearray(blob)
        for _ in range(data.draw(st.integers(1, 4))):
            op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            pos = data.draw(st.integers(0, max(len(out) - 1, 0)))
            if op == "flip" and out:
                out[pos] ^= data.draw(st.integers(1, 255))
            elif op == "cut":
                del out[pos : pos + data.draw(st.integers(1, 40))]
            else:
                out[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        return bytes(out)

    base = st.sampled_from([V1, V2.blob, REPLY])
    return st.one_of(
        st.binary(max_size=512),
        st.builds(lambda b, d: mutate(b, d), base, st.data()),
    )


@settings(max_examples=400, deadline=None)
@given(_mutations())
def test_open_v1_raises_only_the_uniform_error(blob: bytes) -> None:
    assert _outcome(lambda: open_v1(KEY, blob)) in (b"known plaintext", UNIFORM)


@settings(max_examples=400, deadline=None)
@given(_mutations())
def test_open_v2_raises_only_the_uniform_error(blob: bytes) -> None:
    outcome = _outcome(lambda: open_v2(KEY, blob, method="POST", path="/v1/completions").body)
    assert outcome in (b"known plaintext", UNIFORM)


@settings(max_examples=400, deadline=None)
@given(_mutations(), st.lists(st.integers(1, 64), max_size=10))
def test_reply_opener_raises_only_the_uniform_error(blob: bytes, cuts: list[int]) -> None:
    opener = V2.reply.opener()
    pieces, rest = [], blob
    for cut in cuts:
        pieces.append(rest[:cut])
        rest = rest[cut:]
    pieces.append(rest)

    def run() -> bytes:
        out = b"".join(b"".join(opener.feed(piece)) for piece in pieces)
        opener.close()
        return out

    # whatever opens must be the genuine reply, never altered plaintext
    assert _outcome(run) in (b"ab", UNIFORM)


def test_reply_for_another_request_does_not_open() -> None:
    other = ReplyKeys(reply_secret=b"\x00" * 32, enc=V2.reply.enc)
    opener = other.opener()
    with pytest.raises(DecryptionError):
        opener.feed(REPLY)
