"""Container names: what docker accepts and what the reference gateway produces.

Lowercase, ``[a-z0-9-]``, at most 63 characters (a DNS label), so a name is also a valid
hostname and never carries path or shell metacharacters.
"""

from __future__ import annotations

import re

from paygate.upstream.errors import InvalidName

MAX_NAME = 63
_INVALID = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")


def container_name(raw: str) -> str:
    """``raw`` made a container name: lowercased, other characters become ``-``, trimmed."""
    name = _DASHES.sub("-", _INVALID.sub("-", raw.strip().lower())).strip("-")
    name = name[:MAX_NAME].rstrip("-")
    if not name:
        raise InvalidName(f"no usable container name in {raw[:80]!r}")
    return name


def derived_name(base: str, suffix: str) -> str:
    """``base-suffix`` kept within the limit by shortening ``base``, never the suffix."""
    room = MAX_NAME - len(suffix) - 1
    return container_name(f"{container_name(base)[:room].rstrip('-')}-{suffix}")


def member_deployment(upstream: str, gateway: str | None = None) -> str:
    """The deployment (serving container) name of upstream ``upstream`` of a set:
    ``<gateway>-<upstream>`` under the gateway's own deployment name (``upstream_name``: what
    keeps two gateways on one engine apart, as it does their single upstreams), else
    ``paygate-<upstream>``."""
    if gateway is None:
        return container_name(f"paygate-{upstream}")
    return derived_name(gateway, upstream)


def previous_member_deployment(upstream: str, gateway: str | None) -> str | None:
    """The name that deployment had before names included ``upstream_name``
    (``paygate-<upstream>``), where it is not the name now: adopted at start (see
    :meth:`paygate.upstream.container.ContainerManager.start`)."""
    old = container_name(f"paygate-{upstream}")
    return None if old == member_deployment(upstream, gateway) else old


def deployment_containers(name: str) -> tuple[str, ...]:
    """Every container deployment ``name`` may create: serving, relay and pull (as
    :class:`paygate.upstream.spec.ContainerSpec` names them)."""
    return (name, derived_name(name, "relay"), derived_name(name, "pull"))
