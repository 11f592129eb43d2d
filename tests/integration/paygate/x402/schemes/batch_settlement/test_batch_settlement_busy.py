"""`batch-settlement` when the channel is contended or a request ends early (chain mode, a real
anvil, the real gateway and ledger): a deposit that moved on chain is always mirrored however
busy the channel is, and a request cut short before its verify leaves the channel free for the
payer's next voucher at once."""

from __future__ import annotations

from paygate.x402.schemes.batch_settlement.store import ChannelStore
from tests.fixtures.batch_settlement_support import (
    chain_batch,
    claimer,
    header_for,
    opened_channel,
)
from tests.fixtures.payment_support import PRICE_ATOMIC, post, receipt_of

DEPOSIT = 10 * PRICE_ATOMIC


def busy_replica(monkeypatch) -> list[bool]:
    """Another replica writing the channel between each of this gateway's reads of it and its
    next write (its own takes and releases): every compare-and-set from a read loses. Armed
    while the list holds True."""
    armed: list[bool] = []
    real = ChannelStore.get

    async def get(self, channel_id):
        found = await real(self, channel_id)
        if armed:
            await self._sql(
                "UPDATE bs_channels SET version = version + 1 WHERE channel_id = ?",
                (channel_id,),
            )
        return found

    monkeypatch.setattr(ChannelStore, "get", get)
    return armed


async def test_a_top_up_on_a_channel_another_replica_keeps_changing_is_mirrored_and_served(
    anvil, usdc, payer, seller, tmp_path, gas_key, monkeypatch
):
    """The deposit moved on chain before its mirror is written: that write must never give
    up (it was ChannelBusy out of verify: a 500 and a deposit the ledger never counted)."""
    ledger = tmp_path / "payments.db"
    armed = busy_replica(monkeypatch)
    async with chain_batch(seller, ledger, anvil, gas_key) as stack:
        required, offer, channel = await opened_channel(stack, payer, deposit=DEPOSIT)
        armed.append(True)
        status, headers, body = await post(
            stack, header_for(required, channel.pay(offer, deposit=DEPOSIT))
        )
        armed.clear()
        assert status == 200, (status, dict(headers), body)
        state = receipt_of(headers)["extra"]["channelState"]
        assert state["balance"] == str(2 * DEPOSIT)
        assert state["chargedCumulativeAmount"] == str(2 * PRICE_ATOMIC)
    async with claimer(ledger, anvil, gas_key) as channels:
        mirrored = await channels.store.get(channel.channel_id)
        on_chain = await channels.chain.state(channel.channel_id)
    assert mirrored is not None
    assert mirrored.balance == on_chain.balance == 2 * DEPOSIT
