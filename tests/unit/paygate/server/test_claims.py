"""Which addresses' payment claims admission believes (paygate.server.claims): an address
whose claim was refused is admitted as unpaid until its doubt runs out or a payment from it
verifies; the record is bounded."""

from __future__ import annotations

import base64
import json
import math

import pytest

from paygate.config import ConfigError, load_settings
from paygate.server.claims import DoubtedClaims
from paygate.server.forwarded import address_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_refused_claim_is_doubted_until_its_time_runs_out() -> None:
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, clock=clock)
    assert claims.believed("10.0.0.1")
    claims.refused("10.0.0.1")
    assert not claims.believed("10.0.0.1")
    assert claims.believed("10.0.0.2")  # per address
    clock.now += 59.0
    assert not claims.believed("10.0.0.1")
    clock.now += 1.0
    assert claims.believed("10.0.0.1")
    assert len(claims) == 0  # forgotten once it ran out


def test_a_verified_payment_clears_the_doubt_and_a_new_refusal_restarts_it() -> None:
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, clock=clock)
    claims.refused("10.0.0.1")
    claims.verified("10.0.0.1")
    assert claims.believed("10.0.0.1")
    claims.refused("10.0.0.1")
    clock.now += 50.0
    claims.refused("10.0.0.1")  # refused again: 60 s from now
    clock.now += 50.0
    assert not claims.believed("10.0.0.1")


def test_the_record_is_bounded_and_forgets_the_oldest_first() -> None:
    claims = DoubtedClaims(max_addresses=3, clock=Clock())
    for n in range(5):
        claims.refused(f"10.0.0.{n}")
    assert len(claims) == 3
    assert claims.believed("10.0.0.0")
    assert claims.believed("10.0.0.1")
    assert not any(claims.believed(f"10.0.0.{n}") for n in (2, 3, 4))


@pytest.mark.parametrize("name", ["claimed_opens_per_second", "unpaid_opens_per_second"])
@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, "greater than 0"),
        (-1.0, "greater than 0"),
        (math.nan, "finite number"),
        (math.inf, "finite number"),
        ("inf", "finite number"),
        ("1e400", "finite number"),
    ],
)
def test_an_open_rate_that_is_no_rate_is_refused(name: str, value: object, error: str) -> None:
    with pytest.raises(ConfigError, match=f"{name}: .*{error}"):
        load_settings(None, **{name: value})


def test_the_claimed_open_rate_is_its_own_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(None).claimed_opens_per_second == 50.0
    monkeypatch.setenv("PAYGATE_CLAIMED_OPENS_PER_SECOND", "25.5")
    settings = load_settings(None)
    assert settings.claimed_opens_per_second == 25.5
    assert settings.unpaid_opens_per_second == 10.0
    monkeypatch.setenv("PAYGATE_CLAIMED_OPENS_PER_SECOND", "nan")
    with pytest.raises(ConfigError, match="claimed_opens_per_second"):
        load_settings(None)


def test_which_refusals_of_a_claim_doubt_its_address() -> None:
    from paygate.server.claims import doubts
    from paygate.server.errors import GatewayError, TooManyUploads, UploadsBusy

    def refusal(status: int) -> GatewayError:
        error = GatewayError("refused")
        error.status = status
        return error

    # The sender's doing: a body or payment no good, an outcome already recorded, a payer's rate.
    assert all(doubts(refusal(status)) for status in (400, 402, 409, 429))
    # Not the sender's doing, or nothing opened: a dependency down, the gate's own refusals.
    assert not any(doubts(refusal(status)) for status in (500, 502, 503, 504))
    assert not doubts(TooManyUploads())
    assert not doubts(UploadsBusy())


# --- wide IPv6 allocations: doubts add up along the prefix ---------------------------------


def _v6(p48: int, p56: int, p64: int, *, p32: int = 0xDB8, prefix: int = 64) -> str:
    """The limits' key (forwarded.address_key) of a host in /64 number ``p64`` of /56 number
    ``p56`` of /48 number ``p48`` of the /32 ``2001:p32::``."""
    return address_key(f"2001:{p32:x}:{p48:x}:{(p56 << 8) | p64:x}::1", prefix)


def test_many_doubted_64s_under_one_56_doubt_the_whole_56() -> None:
    """A /56 holds 256 /64s, a /48 65,536: each must not be one more believed claim a minute."""
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, clock=clock)
    for n in range(4):
        assert claims.believed(_v6(1, 0, n))
        claims.refused(_v6(1, 0, n))
    assert not claims.believed(_v6(1, 0, 0xBE))  # a /64 never refused: its /56 is
    assert claims.believed(_v6(1, 1, 0))  # another /56 of the /48: not
    clock.now += 60.0
    assert claims.believed(_v6(1, 0, 0xBE))  # the prefix's doubt ends as any does


def test_56s_struck_under_one_48_doubt_the_48_and_48s_their_32() -> None:
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    for n in range(4):  # one /64 in each of four /56s: no /56 doubted
        claims.refused(_v6(1, n, 0))
    assert not claims.believed(_v6(1, 0x77, 5))
    assert claims.believed(_v6(2, 0, 0))
    for n in range(2, 16):  # one /64 in each of fifteen /48s
        claims.refused(_v6(n, 0, 0))
    assert claims.believed(_v6(0x99, 0, 0))
    claims.refused(_v6(16, 0, 0))  # the sixteenth
    assert not claims.believed(_v6(0x99, 0, 0))
    assert claims.believed(_v6(0, 0, 0, p32=0xDB9))  # another /32


def test_one_customer_cannot_get_its_neighbours_doubted() -> None:
    """Whatever a /56 does, its /48's other /56s are believed; whatever a /48 does, its /32's
    other /48s are."""
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    for n in range(256):
        claims.refused(_v6(1, 0, n))
    assert claims.believed(_v6(1, 1, 0))
    for m in range(64):
        for n in range(4):
            claims.refused(_v6(2, m, n))
    assert not claims.believed(_v6(2, 0x42, 0x42))
    assert claims.believed(_v6(3, 0, 0))


def _believed_of(claims: DoubtedClaims, keys: list[str]) -> int:
    """A forger claiming from each of ``keys`` in turn while believed: its believed claims."""
    believed = 0
    for key in keys:
        if claims.believed(key):
            believed += 1
            claims.refused(key)
    return believed


def test_a_wide_allocation_gets_a_bounded_number_of_believed_claims() -> None:
    """A forger rotating through the /64s of a /48, then of a /32, in the order that gets it
    the most: what it gets is the prefix budgets, not one claim per /64."""
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    keys = [_v6(1, m, n) for m in range(64) for n in range(8)]
    assert _believed_of(claims, keys) <= 3 * 4 + 1  # three /56s' four, and one more
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    keys = [_v6(p48, m, n) for p48 in range(20) for m in range(8) for n in range(8)]
    assert _believed_of(claims, keys) <= 15 * 13 + 1
    assert len(claims) <= 15 * 13 + 1 + 15 * 3 + 15 + 1  # its addresses and prefixes only


def test_ipv4_addresses_and_mapped_ipv4_are_never_grouped() -> None:
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    for n in range(200):
        claims.refused(address_key(f"::ffff:198.51.100.{n}"))
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert not claims.believed("198.51.100.7")
    assert claims.believed("198.51.100.250")  # its own address, not its /24
    assert claims.believed("198.51.101.1")
    for key in ("", "unix:/run/paygate.sock", "2001:db8::zz"):  # no prefix: as given
        claims.refused(key)
        assert not claims.believed(key)


def test_a_wider_address_prefix_is_grouped_only_wider() -> None:
    """``ipv6_prefix`` 48: the key is the /48, only its /32 is above it (sixteen strikes)."""
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    for n in range(15):
        claims.refused(_v6(n, 0, 0, prefix=48))
    assert claims.believed(_v6(0xFF, 0, 0, prefix=48))
    claims.refused(_v6(0xF0, 0, 0, prefix=48))
    assert not claims.believed(_v6(0xFF, 0, 0, prefix=48))


def test_a_refreshed_doubt_is_not_a_new_strike() -> None:
    """The same /64 refused again and again while doubted (through the unpaid gate) counts
    once against its /56: one noisy host does not doubt its neighbours."""
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    for _ in range(10):
        claims.refused(_v6(1, 0, 0))
    assert claims.believed(_v6(1, 0, 1))


def test_the_prefix_strikes_are_bounded() -> None:
    from paygate.server.claims import MAX_STRIKES

    claims = DoubtedClaims(seconds=60.0, max_addresses=8, clock=Clock())
    for n in range(MAX_STRIKES):  # a /64 in each of as many /32s: three prefixes struck each
        claims.refused(_v6(0, 0, 0, p32=0x1000 + n))
    assert len(claims) <= 8
    assert len(claims._strikes) == MAX_STRIKES  # more prefixes struck than it holds


# --- payers behind a doubted address: a verified payment vouches for its payer --------------

PAYER = "0x" + "aB" * 20
OTHER = "0x" + "c7" * 20


def _claim(payer: str, header: str = "PAYMENT-SIGNATURE") -> dict[str, str]:
    """A payment header naming ``payer`` as an exact EIP-3009 payment does."""
    payment = {"x402Version": 2, "payload": {"authorization": {"from": payer, "to": "0x"}}}
    return {header: base64.b64encode(json.dumps(payment).encode()).decode()}


def test_a_payer_verified_from_an_address_is_believed_though_a_neighbour_doubts_it() -> None:
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, clock=clock)
    claims.verified("203.0.113.9", PAYER)
    claims.refused("203.0.113.9", _claim(OTHER))  # the neighbour's forged claim
    assert not claims.believed("203.0.113.9", _claim(OTHER))
    assert not claims.believed("203.0.113.9")  # a claim naming nobody
    for header in ("PAYMENT-SIGNATURE", "X-PAYMENT"):
        assert claims.believed("203.0.113.9", _claim(PAYER.lower(), header))
    claims.refused("203.0.113.10")
    assert not claims.believed("203.0.113.10", _claim(PAYER))  # vouched where it paid only
    clock.now += 50.0
    claims.refused("203.0.113.9", _claim(OTHER))  # the neighbour keeps it doubted
    assert claims.believed("203.0.113.9", _claim(PAYER))


def test_a_vouched_payer_is_believed_under_a_doubted_prefix() -> None:
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    home = _v6(1, 0, 9)
    claims.verified(home, PAYER)
    for n in range(4):
        claims.refused(_v6(1, 0, n))
    claims.refused(home, _claim(OTHER))
    assert not claims.believed(home, _claim(OTHER))
    assert claims.believed(home, _claim(PAYER))


def test_a_refused_claim_naming_a_vouched_payer_spends_its_vouch() -> None:
    """Forged claims naming a vouched payer: one believed open per verified payment."""
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    claims.verified("203.0.113.9", PAYER)
    claims.verified("203.0.113.9", OTHER)
    claims.refused("203.0.113.9", _claim(OTHER))
    assert not claims.believed("203.0.113.9", _claim(OTHER))
    assert claims.believed("203.0.113.9", _claim(PAYER))
    claims.refused("203.0.113.9", _claim(PAYER))  # believed for its vouch, refused: spent
    assert not claims.believed("203.0.113.9", _claim(PAYER))
    claims.verified("203.0.113.9", PAYER)  # its next verified payment vouches again
    claims.refused("203.0.113.9", _claim(OTHER))
    assert claims.believed("203.0.113.9", _claim(PAYER))


def test_a_vouch_runs_out_and_the_vouches_are_bounded() -> None:
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, vouch_seconds=600.0, max_vouched=4, clock=clock)
    claims.verified("203.0.113.9", PAYER)
    clock.now += 600.0
    claims.refused("203.0.113.9")
    assert not claims.believed("203.0.113.9", _claim(PAYER))
    for n in range(10):
        claims.verified(f"203.0.113.{n}", PAYER)
        claims.refused(f"203.0.113.{n}")
    assert len(claims._vouched) == 4
    # Full of live vouches: the first four kept (the one run out made room), none added.
    assert all(claims.believed(f"203.0.113.{n}", _claim(PAYER)) for n in range(4))
    assert not claims.believed("203.0.113.9", _claim(PAYER))
    payers = [f"0x{n:040x}" for n in range(1, 20)]
    for payer in payers:  # at an address vouched for already
        claims.verified("203.0.113.0", payer)
    claims.refused("203.0.113.0")
    assert len(claims._vouched["203.0.113.0"]) <= 4
    assert claims.believed("203.0.113.0", _claim(payers[-1]))
    assert not claims.believed("203.0.113.0", _claim(payers[0]))


def test_a_flood_of_verified_payments_evicts_no_live_vouch() -> None:
    """Verified payments cost an attacker nothing once it drops the connection before the
    reply (released, never charged), and IPv6 addresses are free: the table full, a new
    address is not vouched rather than a payer's live vouch forgotten. A vouch run out, or
    renewed, makes room as before."""
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, vouch_seconds=600.0, max_vouched=8, clock=clock)
    claims.verified("203.0.113.9", PAYER)  # the victim, paying from its NAT
    clock.now += 1.0
    for n in range(1000):
        claims.verified(_v6(7, n >> 8, n & 0xFF), OTHER)  # the flood, from one /48
    assert len(claims._vouched) == 8
    claims.refused("203.0.113.9", _claim(OTHER))  # a neighbour's forged claim
    assert claims.believed("203.0.113.9", _claim(PAYER))
    clock.now += 600.0  # the victim's vouch runs out (the flood's a second later)
    claims.verified("203.0.113.10", PAYER)
    claims.refused("203.0.113.10")
    assert claims.believed("203.0.113.10", _claim(PAYER))


def test_no_payer_or_a_short_one_vouches_for_nothing() -> None:
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    for payer in (None, "", "0x", "0xab"):
        claims.verified("203.0.113.9", payer)
    claims.refused("203.0.113.9")
    assert not claims.believed("203.0.113.9", _claim("0xab"))
    assert not claims.believed("203.0.113.9", {"PAYMENT-SIGNATURE": "%%% not base64"})


def test_a_refusal_for_the_servers_own_failure_doubts_nobody() -> None:
    """A batch-settlement refund answered 402 because the chain could not be read (or the
    refund's outcome is not known yet): the server's failure, not the caller's."""
    from aiohttp import web

    from paygate.server.claims import doubts
    from paygate.server.payments import HttpPaymentRefusal

    response = web.Response(status=402)
    assert doubts(HttpPaymentRefusal(response, "invalid_payment"))
    assert not doubts(HttpPaymentRefusal(response, "refund", server_side=True))


def test_a_vouch_is_believed_and_spent_only_from_the_host_that_earned_it() -> None:
    """A payer and a neighbour in one /64 (one key): the neighbour, knowing the payer's
    address, forges claims naming it from its own host. They are not believed for the payer's
    vouch (no open taken on it), and refused they do not spend it (the payer is not pushed
    into the unpaid gate): only the host whose payment verified uses its vouch."""
    claims = DoubtedClaims(seconds=60.0, clock=Clock())
    key = _v6(1, 0, 0)
    payer_host, neighbour = "2001:db8:1::1", "2001:db8:1::2"
    claims.verified(key, PAYER, payer_host)
    claims.refused(key, _claim(OTHER), neighbour)  # the neighbour's forged claim: doubted
    assert not claims.believed(key, _claim(PAYER), neighbour)
    for _ in range(3):
        claims.refused(key, _claim(PAYER), neighbour)  # naming the payer, refused
    assert claims.believed(key, _claim(PAYER), payer_host)
    claims.refused(key, _claim(PAYER), payer_host)  # the payer's own claim refused: spent
    assert not claims.believed(key, _claim(PAYER), payer_host)
    claims.verified(key, PAYER, neighbour)  # the payer moved host: vouched from there only
    claims.refused(key, _claim(OTHER), payer_host)  # the key doubted again
    assert claims.believed(key, _claim(PAYER), neighbour)
    assert not claims.believed(key, _claim(PAYER), payer_host)


def test_a_neighbours_verified_payments_do_not_evict_a_payers_vouch() -> None:
    """A neighbour in the payer's /64 (one key) verifies payments of several wallets of its
    own from its hosts (never charged, once it leaves before the reply): the address's
    payers full, it vouches no more of them rather than forget the payer's live vouch, and
    its forged claims cannot push the payer into the unpaid gate. Payers sharing one host (a
    NAT) still make room among themselves, the longest unrenewed first."""
    clock = Clock()
    claims = DoubtedClaims(seconds=60.0, vouch_seconds=600.0, clock=clock)
    key = _v6(1, 0, 0)
    payer_host = "2001:db8:1::1"
    claims.verified(key, PAYER, payer_host)
    wallets = [f"0x{n:040x}" for n in range(1, 9)]
    for n, wallet in enumerate(wallets):
        claims.verified(key, wallet, f"2001:db8:1::{n + 2:x}")
    claims.refused(key, _claim(OTHER), "2001:db8:1::99")  # the key doubted
    assert claims.believed(key, _claim(PAYER), payer_host)
    assert not claims.believed(key, _claim(wallets[-1]), f"2001:db8:1::{len(wallets) + 1:x}")
    clock.now += 600.0  # every vouch runs out: room again
    claims.verified(key, wallets[-1], "2001:db8:1::2")
    claims.refused(key, _claim(OTHER), "2001:db8:1::99")
    assert claims.believed(key, _claim(wallets[-1]), "2001:db8:1::2")
    for wallet in wallets:  # one host (a NAT): its own payers, the longest unrenewed out
        claims.verified("203.0.113.9", wallet, "203.0.113.9")
    claims.refused("203.0.113.9", _claim(OTHER), "203.0.113.9")
    assert claims.believed("203.0.113.9", _claim(wallets[-1]), "203.0.113.9")
    assert not claims.believed("203.0.113.9", _claim(wallets[0]), "203.0.113.9")
