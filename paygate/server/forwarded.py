"""Who the caller is: the socket peer, or an X-Forwarded-For entry vouched for by a trusted proxy.

By default no proxy is trusted, so a caller cannot pick its own address by sending the header.
With trusted proxies configured, the chain is read right to left and the first address that
is not a trusted proxy is the caller (the leftmost entries are whatever the caller wrote).

:func:`address_key` is what every per-address limit counts under (rate limits, body slots,
the free quota): one host is one key — an IPv4-mapped IPv6 address is its IPv4 address, and
an IPv6 address is its network of ``ipv6_prefix`` bits (a host is given a /64, and rotating
addresses inside it is free).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_IPV6_PREFIX = 64
# Parsing an address costs more than the rest of a request's address work: the peers seen
# recently are remembered (bounded; a caller rotating addresses only evicts its own).
_REMEMBERED = 4096


@functools.lru_cache(maxsize=_REMEMBERED)
def address_key(address: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """The key per-address limits use for ``address``: IPv4 as is (an IPv4-mapped IPv6
    address as its IPv4), IPv6 as ``network/prefix``; anything unparsable as given."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))
    return str(ip)


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """Networks from settings entries (addresses or CIDR blocks)."""
    return tuple(ipaddress.ip_network(entry, strict=False) for entry in entries)


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], networks: Sequence[Network]
) -> str:
    """The caller's address: ``peer`` unless a trusted proxy forwarded the request."""
    address = _unmapped(peer or "")
    if not networks or not is_trusted(address, networks):
        return address
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, networks):
            try:
                return _unmapped(str(ipaddress.ip_address(hop)))
            except ValueError:
                return address  # a garbled entry: fall back to what we know for sure
        address = hop
    return address


@functools.lru_cache(maxsize=_REMEMBERED)
def _unmapped(address: str) -> str:
    """``::ffff:198.51.100.9`` (a dual-stack socket's IPv4 peer) as ``198.51.100.9``."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return address
