"""Key epochs end to end: a rotation under load drops no request, the previous epoch is served
for its grace period, then retired (410 key_epoch_retired) and its keys destroyed; the client
re-attests once and goes on. The gateway is real (in this process, FAKE model server behind it);
the rotation is asked for as `paygate keys rotate` asks (the request file)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

import enclave
from enclave import SoftwareKey, p256, receipts
from paygate import release, wire
from paygate.client import AsyncPaygateTransport, AttestationPolicy, PaygateTransport
from paygate.server.epochs import request_rotation
from tests.fixtures.gateway_support import Stack, ThreadedStack, eventually, running_stack
from tests.fixtures.payment_support import CHAT, CHAT_BODY
from tests.fixtures.serve_support import PAYGATE
from tests.fixtures.tlog_support import chat, gateway_settings, policy

GRACE = 2.0
BODY = json.dumps(CHAT_BODY).encode()


class Counting(httpx.AsyncBaseTransport):
    """The real HTTP transport, counting what the client fetched."""

    def __init__(self) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self.paths: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        return await self._inner.handle_async_request(request)

    def count(self, path: str) -> int:
        return self.paths.count(path)


def _policy() -> AttestationPolicy:
    return AttestationPolicy(allow_unattested=True, code_digests=frozenset({release.code_digest()}))


async def _document(stack: Stack) -> dict[str, Any]:
    async with stack.client.get(stack.url + wire.PUBKEY_PATH) as response:
        assert response.status == 200
        return dict(await response.json())


async def _post_sealed(stack: Stack, blob: bytes, key_id: str | None) -> tuple[int, str | None]:
    headers = {"Content-Type": enclave.CONTENT_TYPE}
    if key_id is not None:
        headers[wire.KEY_ID_HEADER] = key_id
    async with stack.client.post(stack.url + CHAT, data=blob, headers=headers) as response:
        await response.read()
        return response.status, response.headers.get(wire.ERROR_HEADER)


async def test_rotation_under_load_drops_no_request_then_the_client_reattests_once(
    tmp_path: Path,
) -> None:
    epochs_dir = tmp_path / "epochs"
    async with running_stack(
        key=SoftwareKey.generate(),
        key_epoch=60,
        key_epoch_grace=GRACE,
        key_epoch_dir=epochs_dir,
    ) as stack:
        first = await _document(stack)
        assert [e["state"] for e in first["epochs"]] == ["current"]
        assert first["pubkey"] == first["epochs"][0]["sealing_key"]
        inner = Counting()
        transport = AsyncPaygateTransport(transport=inner, envelope="v2", attestation=_policy())
        async with httpx.AsyncClient(transport=transport, base_url=stack.url, timeout=30) as client:
            warm = await client.post(CHAT, json=CHAT_BODY)
            assert warm.status_code == 200, warm.text
            old_receipt = warm.extensions["paygate_receipt"].token
            assert old_receipt is not None
            key = transport.key(stack.url)
            assert key is not None
            assert key.key_id == first["key_id"]
            # A request sealed to the first epoch, kept to be sent after its retirement.
            kept = enclave.seal_v2(
                key.public_key, BODY, method="POST", path=CHAT, key_id=key.key_id
            ).blob

            statuses: list[int] = []
            stop = asyncio.Event()

            async def load() -> None:
                while not stop.is_set():
                    reply = await client.post(CHAT, json=CHAT_BODY)
                    statuses.append(reply.status_code)

            workers = [asyncio.create_task(load()) for _ in range(4)]
            await eventually(lambda: len(statuses) >= 10, timeout=20)
            status = await asyncio.to_thread(request_rotation, epochs_dir, 20.0)
            assert status["key_id"] != first["key_id"]
            assert [e["id"] for e in status["epochs"]] == [status["key_id"], first["key_id"]]
            during = len(statuses)
            await eventually(lambda: len(statuses) >= during + 10, timeout=20)
            # Within the grace period a request sealed to the previous epoch is served.
            assert (await _post_sealed(stack, kept, first["key_id"]))[0] == 200
            stop.set()
            await asyncio.gather(*workers)
            assert statuses
            assert set(statuses) == {200}, statuses
            assert inner.count(wire.ATTESTATION_PATH) == 1  # the load never re-attested

            # After the grace period the previous epoch is retired: its keys are gone.
            async def retired() -> bool:
                return len((await _document(stack))["epochs"]) == 1

            async with asyncio.timeout(GRACE + 10):
                while not await retired():
                    await asyncio.sleep(0.2)
            document = await _document(stack)
            assert document["retired_receipt_keys"][0]["id"] == first["key_id"]
            # A receipt of the retired epoch still verifies with its published receipt key.
            retired_key = bytes.fromhex(document["retired_receipt_keys"][0]["receipt_key"])
            assert receipts.verify(old_receipt, retired_key)["request_digest"].startswith("sha256:")
            assert await _post_sealed(stack, kept, first["key_id"]) == (410, "key_epoch_retired")
            # Without the clear header the envelope's own key id says the same.
            assert await _post_sealed(stack, kept, None) == (410, "key_epoch_retired")
            # A key id whose replica is another one: 421 wrong_replica, naming it.
            other = enclave.seal_v2(
                key.public_key, BODY, method="POST", path=CHAT, key_id="0" * 16 + "@elsewhere"
            ).blob
            assert await _post_sealed(stack, other, None) == (421, "wrong_replica")

            # The client still holds the retired key: concurrent requests each get a 410, and
            # one re-attestation serves them all; then they are served.
            replies = await asyncio.gather(*(client.post(CHAT, json=CHAT_BODY) for _ in range(4)))
            assert [r.status_code for r in replies] == [200] * 4
            assert inner.count(wire.ATTESTATION_PATH) == 2
            again = replies[0]
            renewed = transport.key(stack.url)
            assert renewed is not None
            assert renewed.key_id == status["key_id"]
            assert again.extensions["paygate"].key_fingerprint == p256.fingerprint(
                bytes.fromhex(status["epochs"][0]["sealing_key"])
            )
            # The receipt of that request is signed by the new epoch's receipt key.
            assert again.extensions["paygate_receipt"].claims["receipt_key"] == p256.fingerprint(
                bytes.fromhex(status["epochs"][0]["receipt_key"])
            )


async def test_unkeyed_requests_open_with_the_current_then_the_previous_epoch(
    tmp_path: Path,
) -> None:
    """v1 (Obol) and unkeyed v2 carry no key id: current epoch first, the previous one within
    its grace period; a key from no live epoch is the uniform decryption failure."""
    epochs_dir = tmp_path / "epochs"
    async with running_stack(
        key=SoftwareKey.generate(), key_epoch=60, key_epoch_grace=30, key_epoch_dir=epochs_dir
    ) as stack:
        old = bytes.fromhex((await _document(stack))["pubkey"])
        # As an operator would: `paygate keys rotate` against the running gateway.
        rotated = await asyncio.to_thread(
            subprocess.run,
            [PAYGATE, "keys", "rotate", "--epoch-dir", str(epochs_dir), "--json"],
            capture_output=True,
            timeout=60,
        )
        assert rotated.returncode == 0, rotated.stderr
        assert json.loads(rotated.stdout)["epochs"][1]["sealing_key"] == old.hex()
        new = bytes.fromhex((await _document(stack))["pubkey"])
        assert new != old
        for point in (new, old):
            assert (await _post_sealed(stack, enclave.seal_v1(point, BODY), None))[0] == 200
            unkeyed = enclave.seal_v2(point, BODY, method="POST", path=CHAT).blob
            assert (await _post_sealed(stack, unkeyed, None))[0] == 200
        stranger = SoftwareKey.generate().public_key
        assert await _post_sealed(stack, enclave.seal_v1(stranger, BODY), None) == (
            400,
            "decryption_failed",
        )
        # A keyed request whose key id was rewritten on the path does not open (the id is
        # authenticated): the id names the previous epoch, the request was sealed to the new.
        live = (await _document(stack))["epochs"]
        forged = bytearray(
            enclave.seal_v2(new, BODY, method="POST", path=CHAT, key_id=live[0]["id"]).blob
        )
        forged[3 : 3 + len(live[1]["id"])] = live[1]["id"].encode()
        assert await _post_sealed(stack, bytes(forged), None) == (400, "decryption_failed")
        # The clear header is checked first, whatever the body: bounded, printable, live here.
        for header, expected in (
            ("x" * 300, (400, "bad_request")),
            ("0" * 16 + "@other-replica", (421, "wrong_replica")),
            ("0" * 16 + "@" + live[0]["id"].partition("@")[2], (410, "key_epoch_retired")),
        ):
            async with stack.client.post(
                stack.url + CHAT, json=CHAT_BODY, headers={wire.KEY_ID_HEADER: header}
            ) as response:
                assert (response.status, response.headers.get(wire.ERROR_HEADER)) == expected
                if expected[1] == "wrong_replica":
                    assert response.headers[wire.REPLICA_HEADER] == "other-replica"
        assert stack.fake.hits["POST /v1/chat/completions"] == 4  # v1 and v2, two keys


def test_sync_client_reattests_after_a_rotation_past_the_grace(tmp_path: Path) -> None:
    """The synchronous transport handles the retired epoch the same way."""
    epochs_dir = tmp_path / "epochs"
    with ThreadedStack(
        key=SoftwareKey.generate(), key_epoch=60, key_epoch_grace=1, key_epoch_dir=epochs_dir
    ) as stack:
        transport = PaygateTransport(envelope="v2", attestation=_policy())
        with httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client:
            assert client.post(CHAT, json=CHAT_BODY).status_code == 200
            before = transport.key(stack.url)
            status = request_rotation(epochs_dir, 20.0)
            for _ in range(150):  # the retirement: past the grace, bounded (15 s)
                document = httpx.get(stack.url + wire.PUBKEY_PATH, timeout=5).json()
                if len(document["epochs"]) == 1:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("the previous epoch was not retired")
            reply = client.post(CHAT, json=CHAT_BODY)
            assert reply.status_code == 200
            after = transport.key(stack.url)
            assert before is not None
            assert after is not None
            assert (before.key_id, after.key_id) == (
                status["epochs"][1]["id"],
                status["key_id"],
            )


async def test_each_rotation_is_a_key_epoch_entry_in_the_transparency_log(
    tmp_path: Path,
) -> None:
    """With the log on, a client's log check (the key-epoch entry of the attested keys must be
    in the log) passes before and after a rotation: the new epoch's keys were logged."""
    from paygate.client.tlog import LogState

    epochs_dir = tmp_path / "epochs"
    settings = gateway_settings(tmp_path, key_epoch=60, key_epoch_grace=1, key_epoch_dir=epochs_dir)
    async with running_stack(key=SoftwareKey.generate(), **settings) as stack:
        state = LogState(tmp_path / "log-state.json")
        assert (await chat(stack.url, policy(state))).status_code == 200
        status = await asyncio.to_thread(request_rotation, epochs_dir, 20.0)

        async def logged() -> bool:
            async with stack.client.get(stack.url + "/v1/log/checkpoint") as response:
                return int((await response.text()).splitlines()[1]) >= 3

        async with asyncio.timeout(15):  # release, first epoch, the rotation's epoch
            while not await logged():
                await asyncio.sleep(0.1)
        reply = await chat(stack.url, policy(state))
        assert reply.status_code == 200
        assert reply.extensions["paygate"].key_fingerprint == p256.fingerprint(
            bytes.fromhex(status["epochs"][0]["sealing_key"])
        )


def test_a_paid_request_with_a_retired_key_is_refused_before_any_payment(
    facilitator: Any, seller: str, payer: Any, usdc: Any, tmp_path: Path
) -> None:
    """The stale key is answered before the 402: nothing is signed for it; after one
    re-attestation the request is paid once and served."""
    from decimal import Decimal

    from paygate.client import SpendPolicy
    from tests.fixtures.chain import PAYER_FUNDS
    from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings

    epochs_dir = tmp_path / "epochs"
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / "ledger.db",
        require_encryption=True,
        key_epoch=60,
        key_epoch_grace=1,
        key_epoch_dir=epochs_dir,
    )
    spend = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])
    with ThreadedStack(key=SoftwareKey.generate(), **settings) as stack:
        transport = PaygateTransport(
            envelope="v2", attestation=_policy(), wallet=payer, spend=spend
        )
        with httpx.Client(transport=transport, base_url=stack.url, timeout=30) as client:
            assert client.post(CHAT, json=CHAT_BODY).status_code == 200
            request_rotation(epochs_dir, 20.0)
            for _ in range(150):  # past the grace: the first epoch retired (bounded, 15 s)
                document = httpx.get(stack.url + wire.PUBKEY_PATH, timeout=5).json()
                if len(document["epochs"]) == 1:
                    break
                time.sleep(0.1)
            reply = client.post(CHAT, json=CHAT_BODY)
            assert reply.status_code == 200, reply.text
        assert len(transport.payments) == 2  # one per request: nothing signed for the stale key
        assert all(record.settled for record in transport.payments)
        assert transport.spent == Decimal(2 * PRICE_ATOMIC) / Decimal(10**6)
        assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC
        assert usdc.balance_of(payer.address) == PAYER_FUNDS - 2 * PRICE_ATOMIC


def test_keys_rotate_without_a_running_gateway_says_so(tmp_path: Path) -> None:
    result = subprocess.run(
        [PAYGATE, "keys", "rotate", "--epoch-dir", str(tmp_path / "none"), "--timeout", "1"],
        capture_output=True,
        timeout=60,
        text=True,
    )
    assert result.returncode == 2
    assert "no running gateway with key epochs" in result.stderr
