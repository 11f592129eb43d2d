"""The receiver's HPKE setup parses the caller's ephemeral point once (the key backend's ECDH
validates it, as every backend must), and a point off the curve still fails as every other
defect does: DecryptionError, before any private-key operation."""

from __future__ import annotations

import pytest

from enclave import DecryptionError, SoftwareKey, hpke, open_v2, p256, seal_v2
from enclave.keys.tee_memory import TeeMemoryKey

INFO = b"paygate test"
# 0x04 || X || Y with Y wrong for X: not a point of P-256.
OFF_CURVE = bytes([4]) + (1).to_bytes(32, "big") + (1).to_bytes(32, "big")


@pytest.mark.parametrize("make", [SoftwareKey.generate, TeeMemoryKey.generate])
@pytest.mark.parametrize("enc", [OFF_CURVE, b"\x04" + b"\x00" * 64, b"\x04" * 10, b""])
def test_a_bad_ephemeral_point_is_a_decryption_error(make: object, enc: bytes) -> None:
    key = make()  # type: ignore[operator]
    with pytest.raises(DecryptionError):
        hpke.setup_base_r(enc, key, INFO)


def test_the_point_is_parsed_once_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    key = SoftwareKey.generate()
    sealed = seal_v2(key.public_key, b'{"x":1}', method="POST", path="/v1/chat/completions")
    parsed: list[bytes] = []
    real = p256.load_public_key

    def counting(point: bytes) -> object:
        parsed.append(bytes(point))
        return real(point)

    monkeypatch.setattr(p256, "load_public_key", counting)
    opened = open_v2(key, sealed.blob, method="POST", path="/v1/chat/completions")
    assert opened.body == b'{"x":1}'
    assert len(parsed) == 1
