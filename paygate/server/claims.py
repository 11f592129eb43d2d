"""Which addresses' payment claims admission still believes, before verifying them.

A request that carries a payment header is a *claim*: on a body-priced route its sealed body is
opened (a key operation) before the payment is verified, through the claimed callers' own
:class:`~paygate.server.opengate.OpenGate` (``claimed_opens_per_second``, higher than the unpaid
callers' rate so that a payer making paid calls one after another is not held to it). A header
costs nothing to forge, though: a flood of forged claims would take that gate's whole rate, and
so the real payers' opens.

So a claim that fails once the key's work is done — its body does not open or parse, its payment
is refused (402), is an identifier's recorded outcome or one in progress (409: never verified
again, so one paid call would otherwise buy a flood of opens), or a payer's rate is spent (429):
any 4xx of the sender's doing — costs its sender, and so does a claim cut short once its open
began (its caller gone before the verdict: the handler cancelled; or an unexpected failure),
else a forger dropping each claim before its verdict is believed for ever; and so does a claim
whose payment verified but whose caller left and was never charged (released: gone before
any reply went out, or mid-stream with ``settle_on_disconnect`` off; else a funded wallet that
pays and leaves before each reply has every claim believed, its open and the model's work done,
for nothing; a payment settled upfront, or a reply under way with ``settle_on_disconnect`` on,
is charged and doubts nobody). Its address is
*doubted* for :data:`DOUBT_SECONDS`, and while doubted, its requests are admitted as unpaid ones
whatever header they carry (the unpaid pool and gate: its one slot per address and the unpaid
rate it shares with every other unpaid caller). A payment verified from the address clears the
address's doubt at once. What a forged-claim flood can take of the claimed gate is then one open
per address per :data:`DOUBT_SECONDS` (plus those opened before its first refusal comes,
``per_ip_open_slots`` at a time, while the first is verified: a claim is believed again once its
body is in, so bodies read at once do not each buy an open), not the gate's rate; past that it
is an unpaid flood, which the unpaid gate already bounds.

Why the unpaid *gate*, and not merely a token of the unpaid bucket taken after the fact: a
token charged for every failed claim would let forged claims drain the unpaid callers' rate as
well as the claimed one; moving the doubted address into the unpaid gate bounds it exactly as an
unpaid caller is bounded, no more (it could send unpaid requests anyway). A refusal that is not
the sender's doing doubts nobody: a 5xx (a dependency down), the gate's own 429 (the address's
open slot taken: nothing was opened), or a 4xx the payment step marks as the server's own
doing (``server_side``: a batch-settlement refund whose channel cannot be read on chain, or
whose outcome is not known yet; a facilitator's ``unexpected_verify_error``, its own failure
to check; a ``…_channel_busy`` whose hold a request left whose replica died mid-request (its
payment still in progress, its lease run out); a ``payment_in_progress`` 409 for a payment
whose replica died mid-request (its lease run out by the ledger's clock), until the
reconciler releases it; a model's token limit for everyone together, ``per_model``, spent
— a payer's own limits, rate and budgets are that payer's doing). A channel held by a live
request (the payer's own concurrent call, or a caller holding its own channel with a slow
one to get refusals that doubt nobody) is the caller's doing, and so is a hold nothing
tells is a payment's, and one under an ended payment's nonce (a payment gives its hold back
as it ends: such a hold is another's under the same key — a refund's, whose voucher names
what the last one served named, or a deposit finishing after its caller left). A sealed
claim refused 410 ``key_epoch_retired`` or 421 ``wrong_replica`` is doubted although a rotation or a
balancer's routing may cause it: its open spent a token of the claimed gate's rate, so a
flood of claims naming a retired key would otherwise take that rate undoubted. Only a
*verified* payment clears a doubt: a request priced at nothing is admitted without its header
being looked at.

**Wide IPv6 allocations.** Per address is :func:`~paygate.server.forwarded.address_key` (an
IPv6 host by its ``ipv6_prefix``, /64 by default): but a /48 holds 65,536 /64s and a /32 four
billion, each otherwise one believed claim a minute. So doubts add up along the prefix, one
level at a time (:data:`PREFIX_LEVELS`: /56, /48, /32, those wider than ``ipv6_prefix``): an
address newly doubted is a *strike* against its /56; a prefix's first strike in a window of
:data:`DOUBT_SECONDS` is one against the prefix above it; and a prefix struck from its budget's
worth of different places below it within the window (4 for a /56 or a /48, 16 for a /32, where
unrelated customers meet) is doubted whole. A /48 (free from tunnel brokers) then gets some
sixteen believed claims a minute (4 /56s of 4 addresses), a /32 some two hundred, not one per
/64; and one allocation cannot get its neighbours doubted (a /56 is one strike against its
/48, a /48 one against its /32). A customer with several allocations can, though: 4 /56s of
one /48, or 16 /48s of one /32 (a hosting provider's or a tunnel broker's, where thousands of
unrelated callers meet), struck within the window doubt that whole prefix, and its callers
without a vouch (below) are admitted as unpaid for as long as the strikes are renewed — the
price of bounding what one such customer's forged claims get. An address under a doubted prefix is
not recorded on its own (the prefix covers it), so one allocation cannot fill the record. IPv4
addresses (IPv4-mapped IPv6 ones included, keyed as IPv4) and unparsable keys have no prefix.
Behind trusted proxies the key is the client's X-Forwarded-For address, as for every limit
(an IPv4-mapped entry unmapped first, so ``::ffff:a.b.c.d`` is ``a.b.c.d`` for doubts and
vouches alike).
A verified payment clears its address's doubt, never a prefix's.

**Payers behind a doubted address.** Callers sharing an address (a NAT, one /64, a doubted
prefix) share its doubt, so a neighbour's forged claims would push a payer into the unpaid gate,
where an unpaid flood answers it 503. So a payer whose payment *verified* from an address is
*vouched* there for :data:`VOUCH_SECONDS` (renewed by each verified payment), from the *host*
it paid from — the caller's own address, which the key covers: an IPv6 /128 under its /64
(behind trusted proxies, the X-Forwarded-For client's). A claim from that host that names that
payer — its address appears anywhere in the payment header's decoded text, whatever the field
(no field is proof before verification: a forger can put any payer in any of them) — is
believed whatever doubts the address or its prefixes. A vouch is no free pass: a claim from its
host naming it that is refused, or cut short once opened, or verified and left uncharged,
spends it (every vouched payer the header names; the payer's own dropped call too), so
forged claims naming a vouched payer get at most one believed open per verified payment of that
payer there (as forged claims naming nobody do: each verified payment from the address clears
its doubt). A claim naming it from another host under the same key (a neighbour in the /64)
is neither believed for it nor spends it: the neighbour can neither use the payer's vouch
nor push the payer into the unpaid gate. What is left: callers sharing one host address (an
IPv4 NAT, a CGNAT, one proxy's X-Forwarded-For entry) cannot be told apart before
verification, so there a neighbour who knows a vouched payer's address can still spend its
vouch with a forged claim naming it (the payer is then admitted as unpaid until one of its
payments verifies again); a payer whose host changes (IPv6 temporary addresses) is vouched
anew by its next verified payment; and a payer with no verified payment from a doubted address
yet is admitted as unpaid until the doubt ends (nothing tells it from a forger before
verification).

Per worker process (each ``--workers`` process doubts on its own: a flood gets one believed claim
per address in each). Every record is bounded (:data:`MAX_DOUBTED` addresses and prefixes,
:data:`MAX_STRIKES` strike counts, the oldest forgotten first: forgetting a doubt only gives
that address its one claimed open again, forgetting a strike count gives its prefix its budget
again; :data:`MAX_VOUCHED` addresses with at most :data:`PAYERS_PER_ADDRESS` vouched payers
each). A live vouch is never forgotten for a new address: a verified payment costs nothing to
an attacker who leaves before the reply (released, never charged) and IPv6 addresses are free,
so evicting the oldest would let one flood of them unvouch every payer. Full of live vouches, a
new address is not vouched until one runs out (a payer there is as it would be without
vouches); a payer's verified payment renews its own vouch whatever the table holds. Likewise
at one address: a payer from one host never takes the place of another host's live vouch (a
neighbour in the /64 verifying a few wallets' payments would otherwise unvouch the payer);
payers sharing one host (a NAT) make room among themselves, the longest unrenewed first.
"""

from __future__ import annotations

import binascii
import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from paygate import wire
from paygate.server.errors import GatewayError, TooManyUploads
from paygate.server.payments import HttpPaymentRefusal, ReplyServedElsewhere

#: Seconds an address whose claim failed is admitted as unpaid (unless a payment verifies).
DOUBT_SECONDS = 60.0
#: Addresses and prefixes doubted at most (each ~170 bytes with its key, measured: ~11 MB in
#: all).
MAX_DOUBTED = 65_536
#: Prefixes whose strikes are counted at most (measured: ~4 MB when full).
MAX_STRIKES = 16_384
#: IPv6 prefixes (those wider than ``ipv6_prefix``) doubts add up to, narrowest first, each with
#: its budget: how many strikes from below within :data:`DOUBT_SECONDS` doubt it whole.
PREFIX_LEVELS: tuple[tuple[int, int], ...] = ((56, 4), (48, 4), (32, 16))
#: Seconds a payer whose payment verified from an address is believed there.
VOUCH_SECONDS = 3600.0
#: Addresses with vouched payers remembered at most, and payers vouched per address (the
#: most recently verified; measured: ~11 MB in all when full, each with its host).
MAX_VOUCHED = 8_192
PAYERS_PER_ADDRESS = 4
# A payer's name shorter than this could be found in any header by chance: never vouched.
_MIN_PAYER_CHARS = 16
_NO_HEADERS: Mapping[str, str] = {}


def doubts(refusal: GatewayError) -> bool:
    """Does ``refusal`` of a claim, met once its body was read, doubt its address? Any 4xx of
    the sender's doing; not the open gate's own per-address refusal (raised before an open),
    nor a payment step's refusal of its own doing (``server_side``: a chain unreadable, a
    model-wide token limit)."""
    if isinstance(refusal, HttpPaymentRefusal | ReplyServedElsewhere) and refusal.server_side:
        return False
    return 400 <= refusal.status < 500 and not isinstance(refusal, TooManyUploads)


class DoubtedClaims:
    """The addresses (and IPv6 prefixes) whose last payment claim was refused, until their
    doubt expires; and the payers vouched for at an address by a verified payment."""

    __slots__ = (
        "_clock",
        "_strikes",
        "_until",
        "_vouched",
        "max_addresses",
        "max_vouched",
        "seconds",
        "vouch_seconds",
    )

    def __init__(
        self,
        *,
        seconds: float = DOUBT_SECONDS,
        max_addresses: int = MAX_DOUBTED,
        vouch_seconds: float = VOUCH_SECONDS,
        max_vouched: int = MAX_VOUCHED,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.seconds = seconds
        self.max_addresses = max_addresses
        self.vouch_seconds = vouch_seconds
        self.max_vouched = max_vouched
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()  # oldest doubt first
        # A prefix → (its strikes from below in this window, until when the window runs).
        self._strikes: OrderedDict[str, tuple[int, float]] = OrderedDict()
        # An address → its vouched payers (lowercase hex, no 0x) → until when, and the host
        # (the caller's own address, an IPv6 /128 under its /64 key) whose payment verified.
        self._vouched: OrderedDict[str, dict[str, tuple[float, str]]] = OrderedDict()

    def believed(
        self, address: str, headers: Mapping[str, str] = _NO_HEADERS, host: str = ""
    ) -> bool:
        """May a claim from ``address`` (its request's ``headers``; ``host``, the caller's own
        address, which ``address`` keys) be admitted as a claim, not as an unpaid request?"""
        if not self._until or not self._doubted(address, self._clock()):
            return True
        return bool(self._named(address, headers, host))

    def refused(
        self, address: str, headers: Mapping[str, str] = _NO_HEADERS, host: str = ""
    ) -> None:
        """A claim from ``address`` (``host``) was refused (:func:`doubts`): doubt it from now
        on (and count it against its prefixes); the vouches it was believed for (the payers it
        names, vouched from ``host``) are spent."""
        now = self._clock()
        named = self._named(address, headers, host)
        if named:
            payers = self._vouched[address]
            for payer in named:
                del payers[payer]
            if not payers:
                del self._vouched[address]
        wider = _wider(address)
        if any(self._live(prefix, now) for prefix, _ in wider):
            return  # its prefix is doubted: that covers it
        struck = not self._live(address, now)  # newly doubted: a strike against its prefix
        self._doubt(address, now)
        for prefix, budget in wider:
            if not struck:
                break
            strikes = self._strike(prefix, now)
            if strikes >= budget:
                self._doubt(prefix, now)
            struck = strikes == 1  # its first in this window: one against the prefix above

    def verified(self, address: str, payer: str | None = None, host: str = "") -> None:
        """A payment of ``payer`` from ``address`` (``host``) was verified: believe the address
        again (not its prefixes: one payer's payment does not vouch for its neighbours), and
        vouch for the payer there, from ``host`` only."""
        self._until.pop(address, None)
        name = (payer or "").lower().removeprefix("0x")
        if len(name) < _MIN_PAYER_CHARS:
            return
        now = self._clock()
        if address not in self._vouched and not self._room(now):
            return  # full of live vouches: a flood of verified payments evicts none of them
        payers = self._vouched.get(address, {})
        if name not in payers and not self._payer_room(payers, host, now):
            return  # full of other hosts' live vouches: a neighbour's payments evict none
        payers = self._vouched.pop(address, None) or {}
        payers.pop(name, None)
        payers[name] = (now + self.vouch_seconds, host)
        self._vouched[address] = payers

    def __len__(self) -> int:
        return len(self._until)

    def _doubted(self, address: str, now: float) -> bool:
        return self._live(address, now) or any(
            self._live(prefix, now) for prefix, _ in _wider(address)
        )

    def _live(self, key: str, now: float) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if now < until:
            return True
        del self._until[key]
        return False

    def _doubt(self, key: str, now: float) -> None:
        self._until.pop(key, None)
        self._until[key] = now + self.seconds
        while len(self._until) > self.max_addresses:
            self._until.popitem(last=False)

    def _strike(self, prefix: str, now: float) -> int:
        count, until = self._strikes.pop(prefix, (0, 0.0))
        if now >= until:
            count, until = 0, now + self.seconds
        self._strikes[prefix] = (count + 1, until)
        while len(self._strikes) > MAX_STRIKES:
            self._strikes.popitem(last=False)
        return count + 1

    def _room(self, now: float) -> bool:
        """Is there room for one more vouched address, once those run out are forgotten?
        (The longest unrenewed first: an address's entry moves last when a payer there
        verifies, so the first one's vouches all ran out, or none did.)"""
        vouched = self._vouched
        while len(vouched) >= self.max_vouched:
            first = next(iter(vouched))
            if any(now < until for until, _ in vouched[first].values()):
                return False
            del vouched[first]
        return True

    @staticmethod
    def _payer_room(payers: dict[str, tuple[float, str]], host: str, now: float) -> bool:
        """Is there room at an address (``payers``) for one more payer vouched from ``host``,
        once those run out are forgotten, else the longest unrenewed from ``host`` itself?
        Never another host's live vouch: else a neighbour under the same key (a /64) that
        verifies a few wallets' payments, never charged once it leaves before the reply,
        unvouches the payer. Callers sharing one host (a NAT) make room among themselves."""
        for payer in [payer for payer, (until, _) in payers.items() if now >= until]:
            del payers[payer]
        if len(payers) < PAYERS_PER_ADDRESS:
            return True
        same = next((payer for payer, (_, at) in payers.items() if at == host), None)
        if same is None:
            return False
        del payers[same]  # the longest unrenewed from this host
        return True

    def _named(self, address: str, headers: Mapping[str, str], host: str) -> list[str]:
        """The payers vouched at ``address`` from ``host`` whose names the payment header
        holds. From another host under the same key (a neighbour in the /64) a vouch is
        neither believed nor spent: it cannot take the vouch's open, nor burn it."""
        payers = self._vouched.get(address)
        if not payers:
            return []
        now = self._clock()
        for payer in [payer for payer, (until, _) in payers.items() if now >= until]:
            del payers[payer]
        if not payers:
            del self._vouched[address]
            return []
        claim = _decoded(headers.get(wire.PAYMENT_SIGNATURE) or headers.get(wire.X_PAYMENT))
        return [payer for payer, (_, at) in payers.items() if at == host and payer in claim]


def _decoded(header: str | None) -> str:
    """A payment header's JSON text, lowercase ("" when it is no base64)."""
    if not header:
        return ""
    try:
        return binascii.a2b_base64(header.encode("ascii", "replace")).decode("latin-1").lower()
    except (binascii.Error, ValueError):
        return ""


@functools.lru_cache(maxsize=4096)
def _wider(address: str) -> tuple[tuple[str, int], ...]:
    """The prefixes of :data:`PREFIX_LEVELS` wider than an IPv6 address key's network,
    narrowest first, with their budgets; none for IPv4 and unparsable keys."""
    if ":" not in address:
        return ()
    try:
        network = ipaddress.IPv6Network(address)
    except ValueError:
        return ()
    return tuple(
        (str(network.supernet(new_prefix=bits)), budget)
        for bits, budget in PREFIX_LEVELS
        if bits < network.prefixlen
    )
