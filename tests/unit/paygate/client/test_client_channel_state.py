"""The client's channels across restarts (paygate.client.channel_state, through the Payer),
without sockets: a payer re-created on the same state file continues its channel; a restart
between signing and the reply; a deposit that never landed; a tampered, truncated or foreign
file refused whole; one holder at a time; max_total across restarts; what the file holds."""

from __future__ import annotations

import gc
import json
import os
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from eth_account.signers.local import LocalAccount

from paygate.client.channels import NO_CHANNEL
from paygate.client.errors import (
    ChannelStateInUse,
    ChannelStateInvalid,
    ChannelStateRejected,
    SpendRefused,
)
from paygate.client.payer import Payer, SpendPolicy
from tests.fixtures.channels_support import (
    URL,
    challenge,
    channel_policy,
    corrective,
    offer,
    paid,
    receipt,
)


def restart(account: LocalAccount, path: Path, before: Payer | None, **overrides: Any) -> Payer:
    """The process ends (its payer lets go of the file, as a dying process does) and a new one
    starts on the same file."""
    if before is not None:
        before.close()
    return Payer(account, channel_policy(**overrides), path)


@pytest.fixture
def account() -> LocalAccount:
    return Account.create()


def test_a_restarted_payer_continues_its_channel_without_a_second_deposit(
    account: LocalAccount, tmp_path: Path
) -> None:
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    records = paid(first, 3)
    assert [r.deposit for r in records] == [Decimal("0.02"), 0, 0]
    (channel,) = first.channels.channels()

    second = restart(account, path, first)
    assert second.spent == Decimal("0.02")  # the deposit still counts against max_total
    (kept,) = second.channels.channels()
    assert kept.channel_id == channel.channel_id
    assert (kept.deposited, kept.payer.charged, kept.signed, kept.rest) == (
        20000,
        3000,
        3000,
        17000,
    )
    more = paid(second, 3)
    assert [r.deposit for r in more] == [0, 0, 0]
    assert [r.nonce.partition(":")[2] for r in more] == ["4000", "5000", "6000"]
    assert second.spent == Decimal("0.02")


def test_a_restart_between_signing_and_the_reply_never_pays_twice(
    account: LocalAccount, tmp_path: Path
) -> None:
    """The third voucher (3000) was signed and sent; the process died before its reply. The
    seller may have charged it or not: either way the next request is paid once."""
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    paid(first, 2)
    first.pay(challenge(), url=URL)  # voucher 3000 in flight

    # Used by the seller: our next voucher (3000 again: we count 2000 charged) is stale, the
    # corrective 402 names our own 3000, which the file says we signed: paid once more at 4000.
    used = restart(account, path, first)
    (channel,) = used.channels.channels()
    assert (channel.payer.charged, channel.signed) == (2000, 3000)
    stale = used.pay(challenge(), url=URL).record
    assert stale.nonce.endswith(":3000")  # never below what we signed
    again = corrective(used, stale, 3000, 3000)
    assert again is not None
    assert again.record.nonce.endswith(":4000")
    # A seller naming a voucher above any we signed (before or after the restart) is refused.
    with pytest.raises(ChannelStateRejected, match="above any we signed"):
        corrective(used, again.record, 5000, 5000)

    after = restart(account, path, used)  # and again, before the 4000's reply
    (channel,) = after.channels.channels()
    assert (channel.payer.charged, channel.signed) == (3000, 4000)  # written before it left

    # Not used (another channel): the same 3000 is simply accepted and counted once.
    other = tmp_path / "other.json"
    before = restart(account, other, None)
    paid(before, 2)
    before.pay(challenge(), url=URL)
    unused = restart(account, other, before)
    record = unused.pay(challenge(), url=URL).record
    assert record.nonce.endswith(":3000")
    record.receipt = receipt(1000)
    unused.channel_receipt(record)
    (channel,) = unused.channels.channels()
    assert (channel.payer.charged, channel.signed, unused.spent) == (3000, 3000, Decimal("0.02"))


def test_a_deposit_that_never_landed_is_paid_again_and_counted_both_times(
    account: LocalAccount, tmp_path: Path
) -> None:
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    assert first.pay(challenge(), url=URL).record.deposit == Decimal("0.02")  # then: a crash

    second = restart(account, path, first)
    assert second.spent == Decimal("0.02")
    voucher = second.pay(challenge(), url=URL).record
    assert voucher.deposit == 0  # we believe the channel holds our deposit
    again = second.resync(voucher, challenge(offer(), error=NO_CHANNEL), url=URL)
    assert again is not None
    assert again.record.deposit == Decimal("0.02")
    # The first authorization may still be used until it expires: it stays counted.
    assert second.spent == Decimal("0.04")
    again.record.receipt = receipt(1000)
    second.channel_receipt(again.record)

    third = restart(account, path, second)
    assert third.spent == Decimal("0.04")
    # Confirmed now: a seller that "forgets" the channel gets no third deposit.
    record = third.pay(challenge(), url=URL).record
    assert third.resync(record, challenge(offer(), error=NO_CHANNEL), url=URL) is None
    assert third.spent == Decimal("0.04")


@pytest.mark.parametrize(
    "damage",
    ["truncated", "count", "payTo", "mac", "mac-not-ascii", "not-json", "empty", "another-wallet"],
)
def test_a_damaged_state_file_is_refused_whole_and_left_in_place(
    account: LocalAccount, tmp_path: Path, damage: str
) -> None:
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    paid(first, 3)
    first.close()
    raw = path.read_bytes()
    document = json.loads(raw)
    if damage == "truncated":
        changed = raw[: len(raw) // 2]
    elif damage == "empty":
        changed = b""
    elif damage == "not-json":
        changed = b"\x00" * 64
    else:
        if damage == "count":  # believe less was charged: our next voucher would be lower
            document["channels"][0]["charged"] = "0"
        elif damage == "payTo":
            document["channels"][0]["key"][3] = Account.create().address
        elif damage == "mac":
            document["mac"] = "00" * 32
        elif damage == "mac-not-ascii":  # hmac.compare_digest refuses such a str: a TypeError
            document["mac"] = "\u00e9" * 64
        changed = json.dumps(document).encode()
    path.write_bytes(changed)
    owner = Account.create() if damage == "another-wallet" else account
    with pytest.raises(ChannelStateInvalid) as refused:
        Payer(owner, channel_policy(), path)
    assert refused.value.code == "channel_state_invalid"
    assert str(path.parent) not in str(refused.value)  # the file's name, not the whole path
    assert path.read_bytes() == changed  # kept for whoever looks into it
    # The lock went with the refusal: the same file, once made whole, is taken again.
    path.write_bytes(raw)
    again = Payer(account, channel_policy(), path)
    assert again.spent == Decimal("0.02")


def test_an_older_state_file_is_refused_by_the_sellers_own_voucher(
    account: LocalAccount, tmp_path: Path
) -> None:
    """A file rolled back (a backup) verifies, but knows fewer vouchers than we signed: the
    seller's state, naming one of those, is refused — nothing is signed above it."""
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    paid(first, 2)
    old = path.read_bytes()
    paid(first, 2)
    first.close()
    path.write_bytes(old)
    restored = Payer(account, channel_policy(), path)
    stale = restored.pay(challenge(), url=URL).record
    with pytest.raises(ChannelStateRejected, match="above any we signed"):
        corrective(restored, stale, 4000, 4000)


def test_one_holder_at_a_time(account: LocalAccount, tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    with pytest.raises(ChannelStateInUse) as held:
        Payer(account, channel_policy(), path)
    assert held.value.code == "channel_state_in_use"
    paid(first, 1)
    first.close()
    # Closed, it signs nothing more on the file's channels (another may hold it now).
    with pytest.raises(SpendRefused, match="not saved, nothing sent"):
        paid(first, 1)
    assert Payer(account, channel_policy(), path).spent == Decimal("0.02")
    # A payer dropped without close() lets go when it is collected.
    del first
    dropped = Payer(account, channel_policy(), tmp_path / "dropped.json")
    del dropped
    gc.collect()
    Payer(account, channel_policy(), tmp_path / "dropped.json").close()
    with pytest.raises(ValueError, match="opens none"):
        Payer(account, SpendPolicy(max_per_request="0.01"), tmp_path / "other.json")


def test_max_total_holds_across_restarts_and_refunds(account: LocalAccount, tmp_path: Path) -> None:
    path = tmp_path / "channels.json"
    first = restart(account, path, None, max_total="0.03")
    paid(first, 20)  # the deposit is spent: a second one would pass max_total
    with pytest.raises(SpendRefused, match="max total"):
        first.pay(challenge(), url=URL)
    second = restart(account, path, first, max_total="0.03")
    with pytest.raises(SpendRefused, match="max total"):
        second.pay(challenge(), url=URL)

    third = restart(account, path, second)
    paid(third, 3)  # a top-up: 0.04 locked up
    assert third.spent == Decimal("0.04")
    (channel,) = third.channels.channels()
    back = third.channels.refunded(channel, channel.rest)
    third.refunded(Decimal(back) / 10**6)
    assert third.spent == Decimal("0.023")  # what was charged, for good
    assert third.channels.channels() == []
    fourth = restart(account, path, third)
    assert fourth.spent == Decimal("0.023")
    assert fourth.channels.channels() == []


def test_the_file_is_private_holds_no_key_and_a_failed_write_sends_nothing(
    account: LocalAccount, tmp_path: Path
) -> None:
    path = tmp_path / "state" / "channels.json"
    p = restart(account, path, None)
    record = p.pay(challenge(), url=URL).record
    assert path.stat().st_mode & 0o777 == 0o600
    text = path.read_text()
    assert account.key.hex().removeprefix("0x") not in text
    assert "signature" not in text  # no voucher nor deposit authorization is kept
    assert record.nonce.split(":")[0] in text
    p.close()

    other = tmp_path / "other.json"
    q = Payer(account, channel_policy(), other)
    os.mkdir(other)  # the next write cannot replace it
    with pytest.raises(SpendRefused, match="not saved, nothing sent"):
        q.pay(challenge(), url=URL)
    assert q.spent == 0
    assert q.channels.channels() == []


@pytest.mark.parametrize(
    "changed",
    [
        {"receiverAuthorizer": "0x" + "b2" * 20},
        {"withdrawDelay": "864000"},
    ],
)
def test_a_kept_channel_is_paid_only_under_its_own_terms(
    account: LocalAccount, tmp_path: Path, changed: dict[str, str]
) -> None:
    """A channel kept in the file was opened under some authorizer and withdraw delay; an
    offer (checked against attested terms or not) naming others is not paid through it: its
    deposit and vouchers would put the money under terms nobody checked."""
    path = tmp_path / "channels.json"
    first = restart(account, path, None)
    paid(first, 2)
    second = restart(account, path, first)
    before = path.read_bytes()
    with pytest.raises(SpendRefused, match="channel terms differ"):
        second.pay(challenge(offer(**changed)), url=URL)
    assert path.read_bytes() == before  # nothing signed, nothing written
    (channel,) = second.channels.channels()
    assert (channel.payer.charged, channel.signed) == (2000, 2000)
    # The channel's own terms still pay.
    assert paid(second, 1)[0].nonce.endswith(":3000")


def test_a_write_left_to_the_transport_holds_its_channel_and_never_moves_the_file_back(
    account: LocalAccount, tmp_path: Path
) -> None:
    path = tmp_path / "channels.json"
    p = restart(account, path, None)
    first = p.pay(challenge(), url=URL, write=False)  # as the transports pay: written later
    assert first.save is not None
    assert not path.exists()
    # Held from signing, not from the write: a second request on the channel is refused.
    with pytest.raises(SpendRefused, match="in use by another request"):
        p.pay(challenge(), url=URL, write=False)
    other = p.pay(challenge(), url="http://127.0.0.1:10/v1/chat/completions", write=False)
    assert other.save is not None
    other.save()  # written first, with the book as it is now: both channels' vouchers
    first.save()  # already on disk: not written over with an older count
    kept = {c["channelId"]: c["signed"] for c in json.loads(path.read_text())["channels"]}
    ids = {r.record.nonce.partition(":")[0] for r in (first, other)}
    assert kept == dict.fromkeys(ids, "1000")
