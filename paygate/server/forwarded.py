"""Who the caller is: the socket peer, or an X-Forwarded-For entry vouched for by a trusted proxy.

By default no proxy is trusted, so a caller cannot pick its own address by sending the header.
With trusted proxies configured, the chain is read right to left and the first address that
is not a trusted proxy is the caller (the leftmost entries are whatever the caller wrote).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
    address = peer or ""
    if not networks or not is_trusted(address, networks):
        return address
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not is_trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return address  # a garbled entry: fall back to what we know for sure
        address = hop
    return address
