"""Regenerate tests/vectors/rfc9180_p256_sha256_aes256gcm.json from PyPI cryptography-vectors.

Keeps the RFC 9180 base-mode vector for the one suite paygate uses:
DHKEM(P-256, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM (kem 0x0010, kdf 0x0001, aead 0x0002).
Run: .venv/bin/python scripts/regen_hpke_vectors.py
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests/vectors/rfc9180_p256_sha256_aes256gcm.json"


def main() -> None:
    source = resources.files("cryptography_vectors") / "HPKE" / "test-vectors.json"
    vectors = json.loads(source.read_text())
    chosen = [
        v
        for v in vectors
        if (v["mode"], v["kem_id"], v["kdf_id"], v["aead_id"]) == (0, 0x10, 0x01, 0x02)
    ]
    if len(chosen) != 1:
        raise SystemExit(f"expected one base-mode vector for the suite, found {len(chosen)}")
    OUT.write_text(json.dumps(chosen[0], indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
