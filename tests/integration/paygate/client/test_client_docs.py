"""docs/CLIENT.md's examples, run: each ``python`` block after the setup block, in a fresh
interpreter, against the real paid gateway (FAKE model server, anvil, SDK facilitator)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from enclave import p256
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings

ROOT = Path(__file__).resolve().parents[4]
DOC = ROOT / "docs" / "CLIENT.md"
BLOCK = re.compile(r"(?:<!-- expect: (?P<expect>.+?) -->\s*)?```python\n(?P<code>.*?)```", re.S)


def examples() -> list[tuple[str, str | None]]:
    return [(m["code"], m["expect"]) for m in BLOCK.finditer(DOC.read_text())]


def test_the_doc_has_a_setup_and_an_expectation_for_every_example() -> None:
    blocks = examples()
    assert len(blocks) >= 5
    assert blocks[0][1] is None
    assert all(expect for _, expect in blocks[1:])


def test_every_example_in_client_md_runs(
    facilitator: Any, usdc: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "wallet.key"
    key_file.write_text(payer.key.hex() + "\n")
    key_file.chmod(0o600)
    settings = paid_settings(
        seller=seller, facilitator_url=facilitator.url, ledger=tmp_path / "ledger.db"
    )
    (setup, _), *blocks = examples()
    paid = 0
    with ThreadedStack(**settings) as stack:
        env = {
            **os.environ,
            "PAYGATE_URL": stack.url,
            "PAYGATE_KEY_FINGERPRINT": p256.fingerprint(stack.key.public_key),
            "PAYGATE_WALLET_KEY_FILE": str(key_file),
        }
        for code, expect in blocks:
            result = subprocess.run(
                [sys.executable, "-c", setup + "\n" + code],
                capture_output=True,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=120,
            )
            assert result.returncode == 0, f"{code}\n---\n{result.stderr}"
            assert expect is not None
            assert expect in result.stdout, f"{code}\n---\n{result.stdout}"
            paid += "spend_refused" not in expect
    assert usdc.balance_of(seller) == paid * PRICE_ATOMIC
    assert usdc.balance_of(payer.address) == PAYER_FUNDS - paid * PRICE_ATOMIC
