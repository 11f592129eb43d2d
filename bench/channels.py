"""Pre-opened `batch-settlement` channels and their vouchers, for load on a paid gateway.

A voucher is cumulative (``charged + price``) and the gateway takes one channel's requests one
at a time and in order, so each load connection pays on a channel of its own: ``fresh(n, k)``
opens ``n`` channels through the gateway (each a real deposit request, settled on anvil and
mirrored in the gateway's ledger, as a caller's first request does) and writes ``k`` vouchers
for each, one PAYMENT-SIGNATURE value a line, to files ``<stem>.1`` … ``<stem>.n``. Channels
are never reused between load runs: a request cut off at the end of a run may or may not have
been charged, so the next voucher of that channel is not known.

Vouchers are signed here over the EIP-712 digest (``channel.voucher_digest``, keccak and
secp256k1 in C: about 0.1 ms) instead of eth-account's encoder (about 4 ms); the first of each
channel is checked against ``channel.sign_voucher``.
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import coincurve
from eth_account import Account
from paygate_dev.chain.constants import CHAIN_ID

from paygate import wire
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.client import PayerChannel

OPEN_TIMEOUT = 60.0


def _encode(payment: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(payment, separators=(",", ":")).encode()).decode()


class ChannelSource:
    """Opens channels for one payer on the gateway at ``url`` (its 402 names the offer)."""

    def __init__(self, anvil: Any, url: str, body: bytes, tmp: Path) -> None:
        self._anvil = anvil
        self._url = url
        self._body = body
        self._tmp = tmp
        self._runs = 0
        self._payer = Account.create()
        self._key = coincurve.PrivateKey(bytes(self._payer.key))
        request = urllib.request.Request(  # noqa: S310 - the bench's own loopback gateway
            url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310 - loopback
        except urllib.error.HTTPError as exc:
            required = json.loads(base64.b64decode(exc.headers[wire.PAYMENT_REQUIRED]))
        else:
            raise RuntimeError("the paid gateway served without payment")
        (self._offer,) = [o for o in required["accepts"] if o["scheme"] == ch.NAME]
        self._resource = required["resource"]
        self.price = int(self._offer["amount"])

    def _payment(self, payload: dict[str, Any]) -> str:
        return _encode(
            {
                "x402Version": 2,
                "resource": self._resource,
                "accepted": self._offer,
                "payload": payload,
            }
        )

    def _open(self, vouchers: int, path: Path) -> None:
        """One channel: its deposit request (which pays the first request too), then the
        following ``vouchers`` vouchers written to ``path``."""
        channel = PayerChannel.open(
            self._payer, self._offer, CHAIN_ID, salt="0x" + os.urandom(32).hex()
        )
        deposit = self.price * max(vouchers + 1, 10)  # the offer's minimum: ten requests
        header = self._payment(channel.pay(self._offer, deposit=deposit))
        request = urllib.request.Request(  # noqa: S310 - the bench's own loopback gateway
            self._url,
            data=self._body,
            method="POST",
            headers={"Content-Type": "application/json", wire.PAYMENT_SIGNATURE: header},
        )
        with urllib.request.urlopen(request, timeout=OPEN_TIMEOUT) as reply:  # noqa: S310
            if reply.status != 200:
                raise RuntimeError(f"a bench deposit was answered {reply.status}")
        channel.charged += self.price
        channel_id = channel.channel_id
        config = channel.config.wire()
        lines = []
        for n in range(vouchers):
            maximum = channel.charged + self.price * (n + 1)
            raw = self._key.sign_recoverable(
                ch.voucher_digest(channel_id, maximum, CHAIN_ID), hasher=None
            )
            signature = "0x" + (raw[:64] + bytes((raw[64] + 27,))).hex()
            if n == 0 and signature != ch.sign_voucher(self._payer, channel_id, maximum, CHAIN_ID):
                raise RuntimeError("the voucher digest here differs from the scheme's")
            voucher = {
                "channelId": channel_id,
                "maxClaimableAmount": str(maximum),
                "signature": signature,
            }
            payload = {"type": "voucher", "channelConfig": config, "voucher": voucher}
            lines.append(self._payment(payload))
        path.write_text("\n".join(lines) + "\n")

    def fresh(self, channels: int, vouchers: int) -> Path:
        """``channels`` new channels of ``vouchers`` vouchers each: the files' common stem."""
        self._runs += 1
        stem = self._tmp / f"vouchers-{self._runs}"
        self._anvil.mint(self._payer.address, self.price * max(vouchers + 1, 10) * channels)
        with ThreadPoolExecutor(max_workers=min(16, channels)) as pool:
            list(
                pool.map(
                    lambda i: self._open(vouchers, Path(f"{stem}.{i}")), range(1, channels + 1)
                )
            )
        return stem

    @staticmethod
    def lines(stem: Path, index: int = 1) -> list[str]:
        return Path(f"{stem}.{index}").read_text().split()
