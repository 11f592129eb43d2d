"""Networks and assets: the USDC table, network names ↔ CAIP-2, decimal prices → atomic units.

v1 names networks ("base-sepolia"), v2 uses CAIP-2 ("eip155:84532"); both resolve to one
:class:`Network`. An operator may add a custom EIP-3009 asset (address, EIP-712 name and
version, decimals) on any EVM chain id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, ROUND_HALF_UP, Decimal, InvalidOperation

from eth_utils import to_checksum_address

from paygate.errors import PaygateError


class UnknownNetwork(PaygateError):
    message = "the network is not one paygate knows"
    code = "unknown_network"


@dataclass(frozen=True, slots=True)
class Asset:
    """An EIP-3009 token: its address and the EIP-712 domain it signs under."""

    address: str
    name: str
    version: str
    decimals: int = 6

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", to_checksum_address(self.address))


@dataclass(frozen=True, slots=True)
class Network:
    name: str  # the v1 name
    chain_id: int
    usdc: Asset | None
    # The CAIP-2 id, made once: every paid request reads it several times.
    caip2: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "caip2", f"eip155:{self.chain_id}")


def _usdc(address: str, name: str = "USD Coin") -> Asset:
    return Asset(address=address, name=name, version="2", decimals=6)


NETWORKS: tuple[Network, ...] = (
    Network("base", 8453, _usdc("0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913")),
    Network("base-sepolia", 84532, _usdc("0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC")),
    Network("ethereum", 1, _usdc("0xA0b86991c6218b36c1d19D4a2e9Eb0cE3606eB48")),
    Network("polygon", 137, _usdc("0x3c499c542cEF5E3811e1192ce70d8cC03d5c3359")),
    Network("polygon-amoy", 80002, _usdc("0x41E94Eb019C0762f9Bfcf9Fb1E58725BfB0e7582")),
    Network("avalanche", 43114, _usdc("0xB97EF9Ef8734C71904D8002F8b6Bc66Dd9c48a6E")),
    Network("avalanche-fuji", 43113, _usdc("0x5425890298aed601595a70AB815c96711a31Bc65")),
    Network("arbitrum-one", 42161, _usdc("0xaf88d065e77c8cC2239327C5EDb3A432268e5831")),
    Network("arbitrum-sepolia", 421614, _usdc("0x75faf114eafb1BDbe2F0316DF893fd58CE46AA4d")),
)

# Each table network by its v1 name and by its CAIP-2 id.
_BY_NAME = {key: n for n in NETWORKS for key in (n.name, n.caip2)}


# A chain id as CAIP-2 writes it: ASCII decimal, no sign and no leading zero ("eip155:08453"
# or Unicode digits would name a table chain as a custom one, without its asset).
_CHAIN_ID = re.compile(r"eip155:[1-9][0-9]{0,19}")


def resolve_network(value: str) -> Network:
    """A network by v1 name or CAIP-2 id; ``eip155:N`` for a chain outside the table works too
    (with no default asset: it then needs a custom one)."""
    text = value.strip().lower()
    known = _BY_NAME.get(text)
    if known is not None:
        return known
    if _CHAIN_ID.fullmatch(text):
        chain_id = int(text[7:])
        return Network(f"eip155-{chain_id}", chain_id, None)
    raise UnknownNetwork(
        f"unknown network {value!r}: use a name or CAIP-2 id from docs/PAYMENTS.md"
    )


def to_atomic(price: Decimal | str, decimals: int) -> int:
    """A decimal amount in whole tokens as atomic units, rounding half up ("0.001" → 1000)."""
    try:
        amount = Decimal(price)
    except InvalidOperation:
        raise ValueError(f"not a decimal amount: {price!r}") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError("an amount must be a finite, non-negative decimal")
    return int((amount.scaleb(decimals)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def to_atomic_ceiling(price: Decimal | str, decimals: int) -> int:
    """Like :func:`to_atomic` but rounding up: a maximum must cover what it bounds."""
    amount = Decimal(price)
    if not amount.is_finite() or amount < 0:
        raise ValueError("an amount must be a finite, non-negative decimal")
    return int((amount.scaleb(decimals)).to_integral_value(rounding=ROUND_CEILING))


def from_atomic(amount: int, decimals: int) -> Decimal:
    return Decimal(amount).scaleb(-decimals)
