"""A `batch-settlement` payer's timed withdrawal learnt while it is pending (chain mode, a real
anvil, the real gateway and ledger, a claimer on the same ledger as a second replica): the claim
pass scans the contract's withdrawal events, claims the withdrawing channel before the delay
ends, and the gateway refuses vouchers the withdrawal could outrun. Its own module: it moves the
chain's clock forward (the withdraw delay), which other tests' fresh authorizations must not see
(each case puts the chain back after it)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from types import SimpleNamespace

import pytest

from paygate import wire
from paygate.x402.schemes.batch_settlement import claims, withdrawals
from paygate.x402.schemes.batch_settlement import client as payer_client
from paygate.x402.schemes.batch_settlement.chain import BatchChain, Head, config_tuple
from paygate.x402.schemes.batch_settlement.client import PayerChannel
from paygate.x402.schemes.batch_settlement.withdrawals import mirror_withdrawal
from paygate.x402.settler import SettlerUnavailable
from tests.fixtures.batch_settlement_support import (
    CHAIN_ID,
    batch_offer,
    chain_batch,
    claimer,
    header_for,
    ledger_for,
    opened_channel,
    payer_sends,
    settlement_contract,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.payment_support import PRICE_ATOMIC, post, receipt_of

DEPOSIT = 10 * PRICE_ATOMIC
WITHDRAWING = "invalid_batch_settlement_evm_withdrawal_pending"
COMPLETIONS = "POST /v1/chat/completions"


def _payer_sends(anvil, payer, call) -> int:
    """The payer's transaction, mined: its block's timestamp."""
    receipt = payer_sends(anvil, payer, call)
    return int(anvil.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


def _later(anvil, monkeypatch, seconds: int) -> None:
    """The chain's clock moved on; the payer's deposit authorizations dated by it (their
    validity window is the contract's to check, against its own clock)."""
    anvil.rpc("evm_increaseTime", [seconds])
    anvil.mine()
    now = int(anvil.w3.eth.get_block("latest")["timestamp"])
    monkeypatch.setattr(payer_client, "time", SimpleNamespace(time=lambda: now))


async def _pass(ledger, anvil, gas_key, **kw) -> int:
    async with claimer(ledger, anvil, gas_key) as channels:
        return await channels.claim_once(**kw)


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_vouchers_after_a_withdrawal_request_are_refused_before_it_can_finish(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, request, store, monkeypatch
):
    """The attack: a channel that owes nothing (its charge claimed), the payer requests a
    withdrawal of everything unclaimed, waits the delay, and sends vouchers before (and after)
    finishing it. The claim pass learns the request from the contract's events while it is
    pending; a voucher once it could finish before the voucher is claimed is refused
    `…_withdrawal_pending` and nothing is served; once it finished, the balance is lowered
    (`…_cumulative_exceeds_balance`); a top-up serves the channel again."""
    ledger = ledger_for(store, tmp_path, request)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the channel owes nothing now
        config = config_tuple(channel.config)
        settlement = settlement_contract(anvil)
        requested = _payer_sends(
            anvil, payer, settlement.functions.initiateWithdraw(config, DEPOSIT - PRICE_ATOMIC)
        )
        await _pass(ledger, anvil, gas_key)  # the request learnt while it is pending
        _later(anvil, monkeypatch, 901)
        await _pass(ledger, anvil, gas_key)  # (a pass runs every scan_every seconds)
        served = stack.fake.completed[COMPLETIONS]
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)
        assert stack.fake.completed[COMPLETIONS] == served
        # The 402 states the channel as the SDK reports it: its withdrawal requested then.
        state = batch_offer(receipt_of(headers, wire.PAYMENT_REQUIRED))["extra"]["channelState"]
        assert state["withdrawRequestedAt"] == requested
        assert (
            "voucherState" not in batch_offer(receipt_of(headers, wire.PAYMENT_REQUIRED))["extra"]
        )
        # The payer finishes: the next pass mirrors the balance it left.
        _payer_sends(anvil, payer, settlement.functions.finalizeWithdraw(config))
        await _pass(ledger, anvil, gas_key)
        async with claimer(ledger, anvil, gas_key) as channels:
            mirrored = await channels.store.get(channel.channel_id)
        assert mirrored is not None
        assert (mirrored.balance, mirrored.withdraw_due) == (PRICE_ATOMIC, None)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers[wire.ERROR_HEADER]) == (
            402,
            "invalid_batch_settlement_evm_cumulative_exceeds_balance",
        )
        assert stack.fake.completed[COMPLETIONS] == served
        # A top-up: the channel is served again.
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)


async def test_a_withdrawing_channel_is_claimed_first_before_its_delay_and_the_seller_paid(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """Two channels owe; the one whose payer requested a withdrawal is claimed at the loop's
    next wake (withdrawing channels only, between claim intervals; first in a full claim)
    before the delay ends: the seller is paid what was served, the payer's withdrawal takes
    only the rest."""
    ledger = tmp_path / "payments.db"
    seller_before = usdc.balance_of(seller)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, other = await opened_channel(stack, payer, deposit=DEPOSIT)
        leaving = PayerChannel.open(payer, batch_offer(required), CHAIN_ID, salt="0x" + "11" * 32)
        for n in range(3):
            deposit = DEPOSIT if n == 0 else 0
            status, headers, body = await post(
                stack, header_for(required, leaving.pay(offer, deposit=deposit))
            )
            assert status == 200, body
            leaving.charged_by(receipt_of(headers), offer)
        payer_before = usdc.balance_of(payer.address)
        # A wake between claim intervals: nothing withdrawing, nothing claimed (the scan's
        # place set: the request below is learnt from its event).
        assert await _pass(ledger, anvil, gas_key, withdrawing_only=True) == 0
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(leaving.config), DEPOSIT
            ),
        )
        async with claimer(ledger, anvil, gas_key, max_per_claim=1) as channels:
            assert await channels.claim_once(withdrawing_only=True) == 1
            claimed = await channels.store.get(leaving.channel_id)
            untouched = await channels.store.get(other.channel_id)
        assert claimed is not None
        assert untouched is not None
        assert claimed.total_claimed == 3 * PRICE_ATOMIC
        assert claimed.withdraw_due is not None
        assert claimed.withdraw_amount == DEPOSIT
        assert untouched.total_claimed == 0  # only the withdrawing channel, at that wake
        assert usdc.balance_of(seller) == seller_before + 3 * PRICE_ATOMIC
        _later(anvil, monkeypatch, 901)
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.finalizeWithdraw(config_tuple(leaving.config)),
        )
        assert usdc.balance_of(payer.address) == payer_before + DEPOSIT - 3 * PRICE_ATOMIC
        assert usdc.balance_of(payer.address) <= PAYER_FUNDS


async def test_a_top_up_covering_the_withdrawal_serves_the_channel_again(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """A channel refused while its withdrawal is pending is served again once the payer tops
    it up by more than the withdrawal takes (the contract keeps the withdrawal pending on a
    deposit; what it leaves covers the voucher): vouchers under balance - withdrawal are
    always claimable, finished or not."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - PRICE_ATOMIC
            ),
        )
        _later(anvil, monkeypatch, 901)
        await _pass(ledger, anvil, gas_key)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body


async def test_a_withdrawal_cancelled_by_a_refund_serves_the_channel_again_at_once(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """The contract cancels a pending withdrawal when a refund returns at least its amount:
    the refund's own reading clears it in the ledger (no wait for the claim loop's scan), so
    after a top-up every voucher the balance covers is served — not only those under what the
    cancelled withdrawal would have left."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - PRICE_ATOMIC
            ),
        )
        _later(anvil, monkeypatch, 901)
        await _pass(ledger, anvil, gas_key)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)
        status, headers, body = await post(
            stack, header_for(required, channel.refund(DEPOSIT - PRICE_ATOMIC))
        )
        assert status == 200, body
        async with claimer(ledger, anvil, gas_key) as channels:
            cleared = await channels.store.get(channel.channel_id)
        assert cleared is not None
        assert (cleared.withdraw_due, cleared.withdraw_requested_at) == (None, 0)
        assert cleared.balance == PRICE_ATOMIC
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        for _ in range(3):  # past what the cancelled withdrawal would have left (2 prices)
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)


async def test_a_channel_new_to_the_ledger_has_its_earlier_withdrawal_read_at_its_deposit(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """A channel funded before this ledger knew it (on chain, or through another gateway's
    ledger), its withdrawal requested then — in blocks the claimer's scan may have passed
    before the channel was this ledger's: the first deposit here reads it, so vouchers past
    what the withdrawal leaves are refused at once, with no claim pass between."""
    async with chain_batch(seller, tmp_path / "elsewhere.db", anvil, gas_key) as stack:
        _, _, elsewhere = await opened_channel(stack, payer, deposit=DEPOSIT)
    _payer_sends(
        anvil,
        payer,
        settlement_contract(anvil).functions.initiateWithdraw(
            config_tuple(elsewhere.config), DEPOSIT
        ),
    )
    _later(anvil, monkeypatch, 901)
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert channel.channel_id == elsewhere.channel_id
        async with claimer(ledger, anvil, gas_key) as channels:
            known = await channels.store.get(channel.channel_id)
        assert known is not None
        assert (known.balance, known.withdraw_amount) == (2 * DEPOSIT, DEPOSIT)
        assert known.withdraw_due is not None
        while channel.charged + PRICE_ATOMIC <= DEPOSIT:  # what the withdrawal leaves
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)


async def test_through_the_sdk_facilitator_a_withdrawing_channel_is_claimed_before_its_delay(
    anvil, usdc, payer, seller, tmp_path, facilitator, gas_key, rewound
):
    """Facilitator mode: the scan reads the chain with the gateway's own RPC endpoint, and the
    withdrawing channel's claim goes through the facilitator, proven on chain: the seller is
    paid before the payer's withdrawal can finish."""
    ledger = tmp_path / "payments.db"
    seller_before = usdc.balance_of(seller)
    settings = {"payment_mode": "facilitator", "facilitator_url": facilitator.url}
    async with chain_batch(seller, ledger, anvil, gas_key, **settings) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        async with claimer(ledger, anvil, gas_key, facilitator_url=facilitator.url) as channels:
            assert await channels.claim_once(withdrawing_only=True) == 0
            _payer_sends(
                anvil,
                payer,
                settlement_contract(anvil).functions.initiateWithdraw(
                    config_tuple(channel.config), DEPOSIT
                ),
            )
            assert await channels.claim_once(withdrawing_only=True) == 1
            claimed = await channels.store.get(channel.channel_id)
        assert claimed is not None
        assert claimed.total_claimed == 2 * PRICE_ATOMIC
        assert claimed.withdraw_amount == DEPOSIT
        assert usdc.balance_of(seller) == seller_before + 2 * PRICE_ATOMIC


async def test_a_voucher_above_what_the_withdrawal_leaves_is_refused_as_soon_as_it_is_known(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """The payer outrunning the claim: requests a withdrawal, then floods vouchers long before
    it can finish. Once the claim loop's wake has learnt it, a voucher above what it leaves is
    refused at once — not only near its due time, which would leave every voucher served
    meanwhile relying on a claim landing before the finish (claimers that died hold the
    claim lease in turn)."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - 2 * PRICE_ATOMIC
            ),
        )
        await _pass(ledger, anvil, gas_key, withdrawing_only=True)  # learnt; due in ~900 s
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body  # 2 prices: what the withdrawal leaves
        channel.charged_by(receipt_of(headers), offer)
        served = stack.fake.completed[COMPLETIONS]
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)
        assert stack.fake.completed[COMPLETIONS] == served


async def test_more_withdrawing_channels_than_one_claim_takes_are_all_claimed_at_one_wake(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """The payer opens more channels than one claim transaction takes, runs each up, and
    requests a withdrawal from all of them at once: a single wake claims every one (a
    transaction per max_per_claim), not max_per_claim a wake — the rest would wait wakes the
    delay may not hold, and what they owe would be lost at the finish."""
    ledger = tmp_path / "payments.db"
    seller_before = usdc.balance_of(seller)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, first = await opened_channel(stack, payer, deposit=DEPOSIT)
        leaving = [first]
        for n in range(1, 3):  # two more channels of the same payer (another salt each)
            channel = PayerChannel.open(payer, offer, CHAIN_ID, salt="0x" + f"{n:02x}" * 32)
            status, headers, body = await post(
                stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
            )
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
            leaving.append(channel)
        assert await _pass(ledger, anvil, gas_key, withdrawing_only=True) == 0
        for channel in leaving:
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
            _payer_sends(
                anvil,
                payer,
                settlement_contract(anvil).functions.initiateWithdraw(
                    config_tuple(channel.config), DEPOSIT
                ),
            )
        async with claimer(ledger, anvil, gas_key, max_per_claim=1) as channels:
            assert await channels.claim_once(withdrawing_only=True) == 3
            for channel in leaving:
                claimed = await channels.store.get(channel.channel_id)
                assert claimed is not None
                assert claimed.total_claimed == 2 * PRICE_ATOMIC
        assert usdc.balance_of(seller) == seller_before + 6 * PRICE_ATOMIC


async def test_a_scan_far_behind_catches_up_in_one_pass_and_learns_a_request_in_the_newest_blocks(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """The gateway was down (its scan's place far behind the head: a week is 300,000 of Base's
    blocks) and the payer requests a withdrawal in the newest block: the next wake's
    scan catches up within its time budget — not ten ranges of 2,000 blocks a pass, which on
    a real chain took longer than the delay — so the request is learnt and a voucher above
    what it leaves is refused."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        # Scaled down (ranges of 10 blocks, 300 behind: 30 ranges) so anvil mines it quickly.
        monkeypatch.setattr(withdrawals, "RANGE_BLOCKS", 10)
        anvil.mine(300)
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - 2 * PRICE_ATOMIC
            ),
        )
        await _pass(ledger, anvil, gas_key, withdrawing_only=True)
        async with claimer(ledger, anvil, gas_key) as channels:
            known = await channels.store.get(channel.channel_id)
        assert known is not None
        assert known.withdraw_amount == DEPOSIT - 2 * PRICE_ATOMIC
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)


async def test_a_new_channels_withdrawal_unread_at_its_deposit_is_read_by_the_next_scan(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """A channel funded elsewhere whose payer requested a withdrawal in blocks this ledger's
    scan has passed, and the endpoint failing the deposit's read of it (`pendingWithdrawals`):
    the next wake's scan reads it all the same (the channel is marked for it) — left to the
    scan's events alone it was never learnt, and vouchers above what it leaves were served."""
    async with chain_batch(seller, tmp_path / "elsewhere.db", anvil, gas_key) as stack:
        _, _, elsewhere = await opened_channel(stack, payer, deposit=DEPOSIT)
    _payer_sends(
        anvil,
        payer,
        settlement_contract(anvil).functions.initiateWithdraw(
            config_tuple(elsewhere.config), DEPOSIT
        ),
    )
    anvil.mine(20)  # past the scan's reorg overlap
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        assert await _pass(ledger, anvil, gas_key) == 0  # the scan's place: here; none to check
        read = BatchChain.pending_withdrawal

        async def unreadable(self, channel_id, block):
            raise SettlerUnavailable("the endpoint is down")

        monkeypatch.setattr(BatchChain, "pending_withdrawal", unreadable)
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        monkeypatch.setattr(BatchChain, "pending_withdrawal", read)
        assert channel.channel_id == elsewhere.channel_id
        await _pass(ledger, anvil, gas_key, withdrawing_only=True)
        async with claimer(ledger, anvil, gas_key) as channels:
            known = await channels.store.get(channel.channel_id)
        assert known is not None
        assert (known.withdraw_amount, known.withdraw_due is not None) == (DEPOSIT, True)
        while channel.charged + PRICE_ATOMIC <= DEPOSIT:  # what the withdrawal leaves
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)


async def test_a_stale_reading_of_a_finished_withdrawal_does_not_clear_a_newer_request(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """A claimer whose lease lapsed mid-pass (or a slow refund) writes a reading older than
    the ledger's: the payer finished one withdrawal and requested another, the current
    claimer mirrored the new one, and the stale reading (no withdrawal pending, at the block
    after the finish) arrives last. It must not clear the new one — the scan has passed its
    event and would never read it again, and every voucher up to the balance would be served."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        config = config_tuple(channel.config)
        settlement = settlement_contract(anvil)
        _payer_sends(anvil, payer, settlement.functions.initiateWithdraw(config, PRICE_ATOMIC))
        await _pass(ledger, anvil, gas_key)
        async with claimer(ledger, anvil, gas_key) as channels:
            stale = await channels.store.get(channel.channel_id)  # the first one, pending
        assert stale is not None
        assert stale.withdraw_amount == PRICE_ATOMIC
        _later(anvil, monkeypatch, 901)
        _payer_sends(anvil, payer, settlement.functions.finalizeWithdraw(config))
        finished = anvil.w3.eth.get_block("latest")
        _payer_sends(
            anvil, payer, settlement.functions.initiateWithdraw(config, DEPOSIT - 3 * PRICE_ATOMIC)
        )
        await _pass(ledger, anvil, gas_key)  # the current claimer mirrors the new request
        async with claimer(ledger, anvil, gas_key) as channels:
            await mirror_withdrawal(
                channels.store,
                channels.claims.chain,
                stale,
                Head(int(finished["number"]), int(finished["timestamp"])),
                time.time,
            )
            known = await channels.store.get(channel.channel_id)
        assert known is not None
        assert (known.withdraw_amount, known.withdraw_due is not None) == (
            DEPOSIT - 3 * PRICE_ATOMIC,
            True,
        )
        # What the new withdrawal leaves: 9 prices held, 7 withdrawn, 1 charged: one more.
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)


async def test_the_first_scans_check_reads_every_channel_there_is_in_one_pass(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """A ledger upgraded to the withdrawal scan with channels already in it whose payers
    requested withdrawals before the scan existed (in blocks it never scans): the first pass
    checks them all within its time budget — a page a pass (100 channels each 260 s) left a
    large ledger's later channels unread for longer than the delay."""
    monkeypatch.setattr(withdrawals, "CHECK_PAGE", 1)  # scaled down: three pages
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, _ = await opened_channel(stack, payer, deposit=DEPOSIT)
        leaving = []
        for n in range(1, 4):
            channel = PayerChannel.open(payer, offer, CHAIN_ID, salt="0x" + f"{n:02x}" * 32)
            status, headers, body = await post(
                stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
            )
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
            _payer_sends(
                anvil,
                payer,
                settlement_contract(anvil).functions.initiateWithdraw(
                    config_tuple(channel.config), DEPOSIT
                ),
            )
            leaving.append(channel)
        anvil.mine(20)  # past the first scan's reorg overlap
        await _pass(ledger, anvil, gas_key, withdrawing_only=True)
        async with claimer(ledger, anvil, gas_key) as channels:
            for channel in leaving:
                known = await channels.store.get(channel.channel_id)
                assert known is not None
                assert known.withdraw_amount == DEPOSIT


async def test_a_small_withdrawal_kept_pending_costs_no_claim_a_wake_and_takes_nothing_owed(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """The payer keeps a small withdrawal pending and goes on spending under what it leaves:
    a wake between claim intervals sends no claim transaction for what it is served (the
    finish cannot take it: each wake's claim was gas for nothing), while what was owed when
    the request was learnt — which the finish could take — is claimed at once. Once the
    withdrawal finished, the claim interval's claim is paid all that was served."""
    ledger = tmp_path / "payments.db"
    seller_before = usdc.balance_of(seller)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key, withdrawing_only=True) == 0  # scan placed
        # Owed 1 price, balance 10: a withdrawal of 9.5 prices would take half of it.
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - PRICE_ATOMIC // 2
            ),
        )
        assert await _pass(ledger, anvil, gas_key, withdrawing_only=True) == 1  # at risk
        # A top-up: the withdrawal now leaves room for more; spent under it, wake after wake.
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        sent = anvil.w3.eth.get_transaction_count(gas_key.address)
        for _ in range(3):
            status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
            assert status == 200, body
            channel.charged_by(receipt_of(headers), offer)
            assert await _pass(ledger, anvil, gas_key, withdrawing_only=True) == 0
        assert anvil.w3.eth.get_transaction_count(gas_key.address) == sent  # no gas spent
        _later(anvil, monkeypatch, 901)
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.finalizeWithdraw(config_tuple(channel.config)),
        )
        assert await _pass(ledger, anvil, gas_key) == 1  # the claim interval's claim
        async with claimer(ledger, anvil, gas_key) as channels:
            mirrored = await channels.store.get(channel.channel_id)
        assert mirrored is not None
        assert mirrored.total_claimed == mirrored.charged == 5 * PRICE_ATOMIC
        assert usdc.balance_of(seller) == seller_before + 5 * PRICE_ATOMIC


async def test_the_pending_withdrawals_reread_keeps_to_the_pass_budget_and_goes_on_next_pass(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """Many withdrawals pending (scaled down: three, a page of one): a pass re-reads them
    only while its time budget lasts (a page at least) — thousands read in one pass held the
    claim lease past its time — and the next passes go on with the ones not read yet, least
    recently read first, until every one follows the chain's clock (here: 500 s ahead)."""
    monkeypatch.setattr(withdrawals, "WITHDRAWING_PAGE", 1)
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, first = await opened_channel(stack, payer, deposit=DEPOSIT)
        leaving = [first]
        for n in range(1, 3):
            channel = PayerChannel.open(payer, offer, CHAIN_ID, salt="0x" + f"{n:02x}" * 32)
            status, _, body = await post(
                stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
            )
            assert status == 200, body
            leaving.append(channel)
        assert await _pass(ledger, anvil, gas_key) == 3  # all claimed: the scan placed
        for channel in leaving:
            _payer_sends(
                anvil,
                payer,
                settlement_contract(anvil).functions.initiateWithdraw(
                    config_tuple(channel.config), PRICE_ATOMIC
                ),
            )
        anvil.mine(2 * withdrawals.REORG_BLOCKS)  # their events behind the scan's rescan
        async with claimer(ledger, anvil, gas_key) as channels:
            assert await channels.claims.withdrawals.scan() == 3  # learnt from their events
            learnt = [(await channels.store.get(c.channel_id)).withdraw_due for c in leaving]
            anvil.rpc("evm_increaseTime", [500])
            anvil.mine()
            followed: list[int] = []
            for _ in range(3):
                assert await channels.claims.withdrawals.scan(budget=0.0) == 1
                now = [(await channels.store.get(c.channel_id)).withdraw_due for c in leaving]
                followed.append(sum(due < was - 400 for was, due in zip(learnt, now, strict=True)))
        assert followed == [1, 2, 3]


class _Refusals:
    """The scan's reports (as the metrics take them): the refused blocks counted."""

    def __init__(self) -> None:
        self.refused = 0

    def withdrawal_scanned(self, behind: int, pending: int) -> None:
        return None

    def withdrawal_scan_failed(self) -> None:
        return None

    def withdrawal_block_refused(self) -> None:
        self.refused += 1


async def test_a_block_the_endpoint_refuses_on_its_own_neither_stops_the_scan_nor_hides_its_request(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """The endpoint refuses eth_getLogs for any range holding one block — the very block of
    the payer's withdrawal request (a node's fault with it, too many results). The scan splits
    down to that block, stops before it (counted, asked again next pass; nothing after it
    taken as scanned), and after REFUSED_PASSES passes in a row passes over it reading every
    channel's withdrawal instead: the request is learnt, and a voucher above what it leaves
    refused. Before, every pass failed at that block for good and the request was never
    learnt."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - 2 * PRICE_ATOMIC
            ),
        )
        refused_block = int(anvil.w3.eth.block_number)
        anvil.mine(20)
        real = BatchChain.withdrawal_moves

        async def withdrawal_moves(self, first, last):
            if first <= refused_block <= last:
                raise SettlerUnavailable("query returned more than 10000 results")
            return await real(self, first, last)

        monkeypatch.setattr(BatchChain, "withdrawal_moves", withdrawal_moves)
        reports = _Refusals()
        async with claimer(ledger, anvil, gas_key) as channels:
            channels.claims.withdrawals.events = reports
            for n in range(1, withdrawals.REFUSED_PASSES):
                await channels.claim_once(withdrawing_only=True)
                assert reports.refused == n
                known = await channels.store.get(channel.channel_id)
                assert known is not None
                assert known.withdraw_due is None  # not learnt yet ...
                place = await channels.store.scan_place()
                assert place is not None
                assert place[0].block < refused_block  # ... and its block not taken as scanned
            await channels.claim_once(withdrawing_only=True)
            assert reports.refused == withdrawals.REFUSED_PASSES
            known = await channels.store.get(channel.channel_id)
            assert known is not None
            assert known.withdraw_amount == DEPOSIT - 2 * PRICE_ATOMIC
            place = await channels.store.scan_place()
            assert (place[0].block, place[1]) == (int(anvil.w3.eth.block_number), None)  # caught up
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        status, headers, _ = await post(stack, header_for(required, channel.pay(offer)))
        assert (status, headers.get(wire.ERROR_HEADER)) == (402, WITHDRAWING)


async def test_two_claimers_dying_in_a_row_still_leave_the_withdrawing_channel_claimed_in_time(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound
):
    """Three replicas on one ledger, waking together every scan_every (the worst phase: a
    lease runs out just as a wake finds it held). The payer requests a withdrawal as the
    replica holding the claim lease dies; the next to take the lease dies too, holding it.
    The third still learns the request and claims the channel before the withdrawal is due,
    its margin left (the ledger's clock moved by hand: no waiting). Before, the lease a dead
    claimer held was two wakes long: the claim came two wakes after the finish could."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        status, headers, body = await post(stack, header_for(required, channel.pay(offer)))
        assert status == 200, body
        channel.charged_by(receipt_of(headers), offer)
        # Everything unclaimed on chain: it would take the second charge.
        requested = _payer_sends(
            anvil,
            payer,
            settlement_contract(anvil).functions.initiateWithdraw(
                config_tuple(channel.config), DEPOSIT - PRICE_ATOMIC
            ),
        )
        now = [float(requested)]
        replicas = []
        async with contextlib.AsyncExitStack() as stack_of:
            for name in ("a", "b", "c"):
                replicas.append(
                    await stack_of.enter_async_context(
                        claimer(ledger, anvil, gas_key, replica=name, clock=lambda: now[0])
                    )
                )
            a, b, c = replicas
            wake = a.claims.scan_every
            assert await a.store.take_claimer("a", a.claims.lease)  # a's pass, and it dies
            b_dead = False
            claimed_at = None
            for k in range(1, 20):
                now[0] = requested + k * wake
                if not b_dead:  # b wakes first, takes the lease, and dies in its pass
                    b_dead = await b.store.take_claimer("b", b.claims.lease)
                if await c.claim_once(withdrawing_only=True):
                    claimed_at = now[0]
                    break
            assert b_dead
            assert claimed_at is not None
            known = await c.store.get(channel.channel_id)
            assert known is not None
            assert known.total_claimed == 2 * PRICE_ATOMIC
            assert known.withdraw_due == requested + 900
            assert claimed_at <= known.withdraw_due - claims.WITHDRAW_MARGIN


async def test_a_pass_longer_than_the_claim_lease_keeps_it_and_lets_it_go_at_its_end(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """The lease a dead claimer leaves is short (half a wake), so a live claimer's pass that
    takes longer — a slow endpoint's scan — renews it while it runs: another replica cannot
    take it meanwhile (two claimers sending the same claims), and takes it once the pass
    ends. (The ledger's clock moved by hand past the lease, twice over.)"""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        now = [time.time()]
        scanning = asyncio.Event()
        go_on = asyncio.Event()
        real = BatchChain.withdrawal_moves

        async def withdrawal_moves(self, first, last):
            scanning.set()
            await go_on.wait()  # a slow endpoint
            return await real(self, first, last)

        monkeypatch.setattr(BatchChain, "withdrawal_moves", withdrawal_moves)
        async with (
            claimer(ledger, anvil, gas_key, replica="a", clock=lambda: now[0]) as a,
            claimer(ledger, anvil, gas_key, replica="b", clock=lambda: now[0]) as b,
        ):
            a.claims.renew_every = 0.05
            renewed = asyncio.Event()
            take = a.store.take_claimer

            async def take_claimer(owner, seconds):
                try:
                    return await take(owner, seconds)
                finally:
                    renewed.set()

            monkeypatch.setattr(a.store, "take_claimer", take_claimer)
            lease = a.claims.lease
            passing = asyncio.create_task(a.claim_once())
            async with asyncio.timeout(30):
                await scanning.wait()
                for _ in range(4):  # half a lease a step: two leases in all
                    now[0] += lease / 2
                    renewed.clear()
                    await renewed.wait()
                    assert not await b.store.take_claimer("b", b.claims.lease)
                go_on.set()
                await passing
            assert await b.store.take_claimer("b", b.claims.lease)  # let go at its end


async def test_a_renewal_that_fails_once_keeps_the_claim_lease_renewed(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """One renewal of the claim lease fails (the ledger's passing failure: a PostgreSQL
    failover, a busy SQLite) while a long pass runs: the next renewals still keep it, so
    another replica cannot take it mid-pass (two claimers scanning and sending the same
    claims) — the pass's own writes after the failure succeed, and so must its renewals."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        await opened_channel(stack, payer, deposit=DEPOSIT)
        assert await _pass(ledger, anvil, gas_key) == 1  # the scan's place: here
        now = [time.time()]
        scanning = asyncio.Event()
        go_on = asyncio.Event()
        real = BatchChain.withdrawal_moves

        async def withdrawal_moves(self, first, last):
            scanning.set()
            await go_on.wait()  # a slow endpoint
            return await real(self, first, last)

        monkeypatch.setattr(BatchChain, "withdrawal_moves", withdrawal_moves)
        async with (
            claimer(ledger, anvil, gas_key, replica="a", clock=lambda: now[0]) as a,
            claimer(ledger, anvil, gas_key, replica="b", clock=lambda: now[0]) as b,
        ):
            a.claims.renew_every = 0.05
            renewed = asyncio.Event()
            failed = asyncio.Event()
            take = a.store.take_claimer
            calls = [0]

            async def take_claimer(owner, seconds):
                calls[0] += 1
                try:
                    if calls[0] == 2:  # the first renewal
                        failed.set()
                        raise OSError("the ledger's connection dropped")
                    return await take(owner, seconds)
                finally:
                    renewed.set()

            monkeypatch.setattr(a.store, "take_claimer", take_claimer)
            lease = a.claims.lease
            passing = asyncio.create_task(a.claim_once())
            async with asyncio.timeout(30):
                await scanning.wait()
                await failed.wait()
                for _ in range(4):  # half a lease a step: two leases in all
                    now[0] += lease / 2
                    renewed.clear()
                    await renewed.wait()
                    assert not await b.store.take_claimer("b", b.claims.lease)
                go_on.set()
                await passing
            assert await b.store.take_claimer("b", b.claims.lease)  # let go at its end


async def test_a_pass_whose_claim_lease_was_taken_meanwhile_sends_no_claim(
    anvil, usdc, payer, seller, tmp_path, gas_key, rewound, monkeypatch
):
    """A claimer frozen in its pass past its lease (a stopped process, a stalled host): the
    lease lapses and another replica takes it. When the first wakes, its renewal finds the
    lease taken — and its pass must not go on to send claims beside the new holder's (the
    same channels claimed by two transactions: one's gas wasted, or both reverted as they
    race): the channel owed is claimed once, by the holder."""
    ledger = tmp_path / "payments.db"
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        _, _, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        now = [time.time()]
        scanning = asyncio.Event()
        go_on = asyncio.Event()
        real = BatchChain.withdrawal_moves

        async def withdrawal_moves(self, first, last):
            scanning.set()
            await go_on.wait()  # the claimer frozen
            return await real(self, first, last)

        monkeypatch.setattr(BatchChain, "withdrawal_moves", withdrawal_moves)
        async with (
            claimer(ledger, anvil, gas_key, replica="a", clock=lambda: now[0]) as a,
            claimer(ledger, anvil, gas_key, replica="b", clock=lambda: now[0]) as b,
        ):
            a.claims.renew_every = 0.05
            lost = asyncio.Event()
            take = a.store.take_claimer

            async def take_claimer(owner, seconds):
                held = await take(owner, seconds)
                if not held:
                    lost.set()
                return held

            monkeypatch.setattr(a.store, "take_claimer", take_claimer)
            passing = asyncio.create_task(a.claim_once())
            async with asyncio.timeout(30):
                await scanning.wait()
                now[0] += 2 * a.claims.lease  # frozen past its lease
                assert await b.store.take_claimer("b", b.claims.lease)
                await lost.wait()  # a's renewal finds it taken
                go_on.set()
                assert await passing == 0
            monkeypatch.setattr(BatchChain, "withdrawal_moves", real)
            assert await b.claims.claim_once() == 1
            known = await b.store.get(channel.channel_id)
            assert known is not None
            assert known.total_claimed == PRICE_ATOMIC
            assert [c.state for c in await b.store.claims()] == ["settled"]
