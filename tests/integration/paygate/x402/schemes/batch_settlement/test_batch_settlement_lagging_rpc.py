"""`batch-settlement` chain readings through a load-balanced RPC whose nodes are not at one
height (real anvils: the chain, and a second node forked from it a block before the channel's
deposit — a node behind; a loopback balancer in front). A reading is stamped with the block it
was read at (``bs_channels.read_block``), which the balancer may name from one node and serve
from another: the node behind answers an error for a block it lacks, and a block named by it
is older than a transaction the other one mined. Neither may fail every reading, nor give a
deposit's proof a reading from before the deposit (its mirror would miss the money)."""

from __future__ import annotations

import base64
import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from paygate_dev.chain.build import load_contract
from paygate_dev.chain.tools import anvil_binary
from paygate_dev.stack import free_port
from web3 import Web3

from paygate.x402.schemes.batch_settlement.chain import BatchChain, Deposit, config_tuple
from paygate.x402.schemes.batch_settlement.channel import SETTLEMENT_ADDRESS
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.payload import BatchSettlementPayload
from paygate.x402.settler import SettlerUnavailable
from tests.fixtures.batch_settlement_support import (
    CHAIN_ID,
    batch_offer,
    chain_batch,
    claimer,
    header_for,
    opened_channel,
    payer_sends,
    settlement_contract,
)
from tests.fixtures.payment_support import PRICE_ATOMIC, challenge_of, post, receipt_of

DEPOSIT = 10 * PRICE_ATOMIC


@contextlib.contextmanager
def node_behind(rpc_url: str, block: int) -> Iterator[str]:
    """A second node of the chain behind ``rpc_url``, at ``block`` (an anvil forked there):
    its RPC URL. Stopped by its own PID."""
    port = free_port()
    proc = subprocess.Popen(
        [
            anvil_binary(),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--silent",
            "--chain-id",
            str(CHAIN_ID),
            "--fork-url",
            rpc_url,
            "--fork-block-number",
            str(block),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError, ValueError):
                ask = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"})
                request = urllib.request.Request(
                    url, ask.encode(), {"content-type": "application/json"}
                )
                with urllib.request.urlopen(request, timeout=2) as answer:  # noqa: S310 - loopback
                    if int(json.loads(answer.read())["result"], 16) == block:
                        break
            assert proc.poll() is None, "the fork did not start"
            assert time.monotonic() < deadline, "the fork did not answer"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.asynccontextmanager
async def balancer(numbers_from: str, rest_from: str) -> AsyncIterator[str]:
    """A loopback JSON-RPC balancer: ``eth_blockNumber`` answered by ``numbers_from``, every
    other request by ``rest_from`` (a balancer may send any request to any node; pinned per
    method here so that each case is the same every run)."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        method = json.loads(body).get("method")
        node = numbers_from if method == "eth_blockNumber" else rest_from
        async with session.post(
            node, data=body, headers={"content-type": "application/json"}
        ) as answer:
            return web.Response(body=await answer.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await session.close()


async def _deposited(stack, anvil, payer) -> tuple[Deposit, str, int]:
    """A channel opened through the gateway: (its deposit, the deposit's transaction, the
    block that mined it)."""
    required = await challenge_of(stack)
    offer = batch_offer(required)
    channel = PayerChannel.open(payer, offer, CHAIN_ID)
    payload = channel.pay(offer, deposit=DEPOSIT)
    status, _, body = await post(stack, header_for(required, payload))
    assert status == 200, body
    block = anvil.w3.eth.get_block("latest", full_transactions=True)
    (tx,) = [t for t in block["transactions"] if t["to"].lower() == SETTLEMENT_ADDRESS.lower()]
    payment = json.loads(base64.b64decode(header_for(required, payload)))
    parsed = BatchSettlementPayload.model_validate(payload)
    deposit = Deposit(payment, dict(offer), parsed, channel.channel_id)
    return deposit, "0x" + bytes(tx["hash"]).hex(), int(block["number"])


async def test_a_deposits_proof_is_read_at_its_receipts_block_when_a_node_behind_names_the_newest(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """The balancer's newest block is named by the node behind (before the deposit): the
    deposit's proof reads the channel at the block that mined it all the same, never at that
    older number — where the channel did not hold the deposit yet, and its mirror would have
    missed the payer's money (vouchers refused, the payer depositing again)."""
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        deposit, tx_hash, mined = await _deposited(stack, anvil, payer)
    with node_behind(anvil.rpc_url, mined - 1) as behind:
        async with balancer(numbers_from=behind, rest_from=anvil.rpc_url) as url:
            chain = BatchChain(url, None, timeout=10.0, settle_timeout=30.0)
            proven = await chain.proven_deposit(tx_hash, deposit)
    assert (proven.balance, proven.block) == (DEPOSIT, mined)


async def test_a_reading_served_by_a_node_behind_the_one_naming_the_block_is_made_at_an_older_one(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """The balancer names the newest block from the chain and reads from the node a block
    behind, which lacks it: the channel is read at the block before, stamped with it (right in
    chain order: the channel as it was there), rather than every reading failing — the claim
    loop's pass, a refund's check. Asked for a reading no older than a block the reader lacks,
    it fails rather than answer older (SettlerUnavailable)."""
    async with chain_batch(seller, tmp_path / "payments.db", anvil, gas_key) as stack:
        deposit, _, mined = await _deposited(stack, anvil, payer)
    with node_behind(anvil.rpc_url, mined - 1) as behind:
        async with balancer(numbers_from=anvil.rpc_url, rest_from=behind) as url:
            chain = BatchChain(url, None, timeout=10.0, settle_timeout=30.0)
            before = await chain.state(deposit.channel_id)
            with pytest.raises(SettlerUnavailable):
                await chain.state(deposit.channel_id, since=mined)
    assert (before.balance, before.total_claimed, before.block) == (0, 0, mined - 1)
    assert (
        await BatchChain(anvil.rpc_url, None, timeout=10.0, settle_timeout=30.0).state(
            deposit.channel_id
        )
    ).balance == DEPOSIT


async def test_a_refund_through_a_node_behind_returns_the_whole_rest_and_says_what_it_returned(
    anvil, usdc, payer, seller, tmp_path, gas_key
):
    """A channel opened and topped up; then the gateway's RPC is a balancer whose newest
    block is named by a node behind, from before the top-up. A refund of the rest is checked
    on chain no older than the ledger's own reading (with the top-up), so the whole rest comes
    back — not the rest before the top-up — and the receipt states what the transaction
    returned (its Refunded event), not the difference of two readings at blocks the top-up
    sits between."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required = await challenge_of(stack)
        offer = batch_offer(required)
        channel = PayerChannel.open(payer, offer, CHAIN_ID)
        for _ in range(2):  # the deposit, then a top-up: one request each
            status, headers, body = await post(
                stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
            )
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
    topped_up = int(anvil.w3.eth.block_number)
    rest = 2 * DEPOSIT - 2 * PRICE_ATOMIC
    paid_before = usdc.balance_of(payer.address)
    with node_behind(anvil.rpc_url, topped_up - 1) as behind:
        async with balancer(numbers_from=behind, rest_from=anvil.rpc_url) as url:
            lagging = SimpleNamespace(rpc_url=url)
            async with chain_batch(seller, ledger, lagging, gas_key) as stack:
                status, headers, body = await post(stack, header_for(required, channel.refund()))
    assert status == 200, body
    assert usdc.balance_of(payer.address) - paid_before == rest
    assert int(receipt_of(headers)["amount"]) == rest


@contextlib.asynccontextmanager
async def logs_balancer(logs_from: str, rest_from: str) -> AsyncIterator[str]:
    """A loopback JSON-RPC balancer: a request (or batch) asking ``eth_getLogs`` answered by
    ``logs_from``, every other one by ``rest_from`` (a whole batch goes to one node)."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        asked = json.loads(body)
        methods = {item.get("method") for item in (asked if isinstance(asked, list) else [asked])}
        node = logs_from if "eth_getLogs" in methods else rest_from
        async with session.post(
            node, data=body, headers={"content-type": "application/json"}
        ) as answer:
            return web.Response(body=await answer.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await session.close()


async def test_a_withdrawal_request_is_learnt_when_a_node_behind_answers_the_events(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """The claimer's scan asks a range of the contract's events up to the newest block, and
    the balancer sends it to a node behind: anvil (like other clients) answers with the events
    up to its own newest block, silently. The payer's withdrawal request, mined past that
    node's height, must not be passed over: the scan's place stays before what it could not
    read, and the next pass (a node holding the blocks) learns the request — not never, its
    block then behind the place."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        _, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        async with claimer(ledger, anvil, gas_key) as channels:
            await channels.claim_once()  # the scan's place: here
        placed = anvil.w3.eth.block_number
        anvil.mine(10)
        call = settlement_contract(anvil).functions.initiateWithdraw(
            config_tuple(channel.config), DEPOSIT - PRICE_ATOMIC
        )
        receipt = payer_sends(anvil, payer, call)
        requested = int(anvil.w3.eth.get_block(receipt["blockNumber"])["timestamp"])
        anvil.mine(20)  # the request well behind the next place, reorganised blocks and all
        with node_behind(anvil.rpc_url, placed) as behind:
            async with logs_balancer(logs_from=behind, rest_from=anvil.rpc_url) as url:
                lagging = SimpleNamespace(rpc_url=url)
                async with claimer(ledger, lagging, gas_key) as channels:
                    await channels.claim_once(withdrawing_only=True)
        async with claimer(ledger, anvil, gas_key) as channels:
            await channels.claim_once(withdrawing_only=True)
            mirrored = await channels.store.get(channel.channel_id)
        assert mirrored is not None
        assert (mirrored.withdraw_requested_at, mirrored.withdraw_amount) == (
            requested,
            DEPOSIT - PRICE_ATOMIC,
        )
        assert mirrored.withdraw_due is not None


@contextlib.asynccontextmanager
async def head_balancer(head_from: str, rest_from: str) -> AsyncIterator[str]:
    """A loopback JSON-RPC balancer: the newest block (``eth_getBlockByNumber`` of
    ``latest``) answered by ``head_from``, every other request by ``rest_from``."""
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        asked = json.loads(body)
        latest = (
            isinstance(asked, dict)
            and asked.get("method") == "eth_getBlockByNumber"
            and asked.get("params", [None])[0] == "latest"
        )
        node = head_from if latest else rest_from
        async with session.post(
            node, data=body, headers={"content-type": "application/json"}
        ) as answer:
            return web.Response(body=await answer.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
        await session.close()


def _initiate_withdraw(anvil, payer, channel, amount: int) -> int:
    """The payer's ``initiateWithdraw`` mined: its block's time (the request's)."""
    settlement = anvil.w3.eth.contract(
        address=Web3.to_checksum_address(SETTLEMENT_ADDRESS),
        abi=load_contract("X402BatchSettlement").abi,
    )
    anvil.rpc("anvil_setBalance", [payer.address, hex(10**18)])
    tx = settlement.functions.initiateWithdraw(
        config_tuple(channel.config), amount
    ).build_transaction(
        {
            "from": payer.address,
            "nonce": anvil.w3.eth.get_transaction_count(payer.address),
            "chainId": CHAIN_ID,
        }
    )
    signed = payer.sign_transaction(tx).raw_transaction
    receipt = anvil.wait_for_receipt(anvil.w3.eth.send_raw_transaction(signed).hex())
    assert receipt["status"] == 1
    return int(anvil.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


async def test_a_pass_whose_newest_block_is_named_by_a_node_behind_keeps_a_known_withdrawal(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """The claimer has learnt the payer's withdrawal request; at a later pass the balancer's
    newest block comes from a node behind the request. That pass's re-read of the pending
    withdrawals reads ``pendingWithdrawals`` there — before the request, so none — and must
    not take it for ended: cleared, vouchers past what the withdrawal leaves would be served
    again, its finish taking them, and the scan's events for it behind its place (never read
    again)."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        _, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        async with claimer(ledger, anvil, gas_key) as channels:
            await channels.claim_once()  # the scan's place: here
        placed = anvil.w3.eth.block_number
        anvil.mine(3)
        requested = _initiate_withdraw(anvil, payer, channel, DEPOSIT - PRICE_ATOMIC)
        async with claimer(ledger, anvil, gas_key) as channels:
            await channels.claim_once(withdrawing_only=True)
            learnt = await channels.store.get(channel.channel_id)
        assert learnt is not None
        assert learnt.withdraw_requested_at == requested
        with node_behind(anvil.rpc_url, placed) as behind:
            async with head_balancer(head_from=behind, rest_from=anvil.rpc_url) as url:
                lagging = SimpleNamespace(rpc_url=url)
                async with claimer(ledger, lagging, gas_key) as channels:
                    await channels.claim_once(withdrawing_only=True)
                    mirrored = await channels.store.get(channel.channel_id)
        assert mirrored is not None
        assert (mirrored.withdraw_requested_at, mirrored.withdraw_amount) == (
            requested,
            DEPOSIT - PRICE_ATOMIC,
        )
        assert mirrored.withdraw_due == learnt.withdraw_due


async def test_a_channel_new_to_the_ledger_learns_its_withdrawal_though_a_node_behind_names_it(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """A channel funded through another ledger, its payer's withdrawal requested, then topped
    up through this gateway (new to its ledger: the claimer's scan may have passed the
    request before the channel was this ledger's, so the deposit reads it). The balancer's
    newest block comes from a node behind the request: the read must still be made no older
    than the deposit's own reading, and the request learnt — else vouchers past what the
    withdrawal leaves are served and its finish takes them."""
    async with chain_batch(seller, tmp_path / "other.db", anvil, gas_key) as stack:
        _, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
    before = anvil.w3.eth.block_number
    requested = _initiate_withdraw(anvil, payer, channel, DEPOSIT - PRICE_ATOMIC)
    ledger = tmp_path / "payments.db"
    with node_behind(anvil.rpc_url, before) as behind:
        async with head_balancer(head_from=behind, rest_from=anvil.rpc_url) as url:
            lagging = SimpleNamespace(rpc_url=url)
            async with chain_batch(seller, ledger, lagging, gas_key) as stack:
                required = await challenge_of(stack)
                offer = batch_offer(required)
                await post(stack, header_for(required, channel.pay(offer, deposit=DEPOSIT)))
    async with claimer(ledger, anvil, gas_key) as channels:
        mirrored = await channels.store.get(channel.channel_id)
    assert mirrored is not None
    assert mirrored.balance == 2 * DEPOSIT
    assert (mirrored.withdraw_requested_at, mirrored.withdraw_amount) == (
        requested,
        DEPOSIT - PRICE_ATOMIC,
    )


async def test_a_pass_whose_newest_block_is_named_by_a_node_behind_reads_no_channel_again(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """The balancer's newest block comes from a node behind the channels' readings: each is
    mirrored from a block above that "newest", as after a chain that fell back — but the
    chain proves none of those blocks gone (it holds them), so the pass reads no channel
    again (up to 500 a pass, several calls each, for readings that change nothing: a pool's
    node behind would cost that every wake)."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        placed = anvil.w3.eth.block_number
        await opened_channel(stack, payer, deposit=DEPOSIT)
        async with claimer(ledger, anvil, gas_key) as channels:
            await channels.claim_once()  # the scan's place, the channel's reading: here
    calls: list[str] = []
    with node_behind(anvil.rpc_url, placed) as behind:
        async with head_balancer(head_from=behind, rest_from=anvil.rpc_url) as url:
            session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

            async def count(request: web.Request) -> web.Response:
                body = await request.read()
                asked = json.loads(body)
                calls.extend(
                    i.get("method") for i in (asked if isinstance(asked, list) else [asked])
                )
                async with session.post(
                    url, data=body, headers={"content-type": "application/json"}
                ) as answer:
                    return web.Response(body=await answer.read(), content_type="application/json")

            app = web.Application()
            app.router.add_post("/", count)
            runner = web.AppRunner(app)
            await runner.setup()
            port = free_port()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            try:
                lagging = SimpleNamespace(rpc_url=f"http://127.0.0.1:{port}")
                async with claimer(ledger, lagging, gas_key) as channels:
                    await channels.claim_once(withdrawing_only=True)
            finally:
                await runner.cleanup()
                await session.close()
    assert "eth_getBlockByNumber" in calls  # the pass ran
    assert "eth_call" not in calls
