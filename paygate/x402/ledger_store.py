"""Where the ledger lives, and opening it: ``sqlite:////absolute/path`` or ``postgresql://…``.

A location is built from explicit values (the app factory and the CLI read the settings); the
PostgreSQL URL and password are secrets: :class:`LedgerLocation` never shows them (``repr``,
``describe``), and no error quotes them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from paygate.x402.ledger import DEFAULT_LEASE_SECONDS
from paygate.x402.ledger_base import Ledger

POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True, slots=True)
class LedgerLocation:
    kind: Literal["sqlite", "postgresql"]
    path: Path | None = None  # sqlite
    conninfo: str | None = field(default=None, repr=False)  # postgresql: a secret
    password: str | None = field(default=None, repr=False)  # from a file or a credential

    def describe(self) -> str:
        """Safe to print: the SQLite path, or only that it is PostgreSQL."""
        if self.kind == "sqlite":
            return f"sqlite:///{self.path}"
        return "postgresql (PAYGATE_LEDGER_URL)"


def parse_ledger_url(url: str) -> LedgerLocation:
    """``postgresql://…``/``postgres://…`` or ``sqlite:////abs/path`` (SQLAlchemy's form: three
    slashes, then the absolute path). ValueError never quotes the URL."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise ValueError("ledger URL is not a URL") from None
    if parts.scheme in POSTGRES_SCHEMES:
        return LedgerLocation(kind="postgresql", conninfo=url.strip())
    if parts.scheme == "sqlite":
        path = unquote(parts.path)
        if parts.netloc or not path.startswith("//") or parts.query or parts.fragment:
            raise ValueError("a SQLite ledger URL is sqlite:////absolute/path (four slashes)")
        return LedgerLocation(kind="sqlite", path=Path(path[1:]))
    raise ValueError("ledger URL must start with postgresql:// or sqlite:///")


def ledger_location(
    *, url: str | None, path: Path, password: Callable[[], str | None]
) -> LedgerLocation:
    """The URL if given (it wins over the path), else the SQLite file at ``path``.
    ``password`` is asked only for a PostgreSQL URL that carries none."""
    if url is None:
        return LedgerLocation(kind="sqlite", path=path)
    location = parse_ledger_url(url)
    if location.kind == "postgresql" and not urlsplit(url).password:
        secret = password()
        if secret is not None:
            return LedgerLocation(kind="postgresql", conninfo=location.conninfo, password=secret)
    return location


async def open_ledger(
    location: LedgerLocation,
    *,
    replica: str | None = None,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    read_only: bool = False,
    migrate: bool = True,
    pool_size: int = 10,
    clock: Callable[[], float] | None = None,
) -> Ledger:
    """Open the ledger at ``location`` (migrated unless ``migrate`` is false or read-only).

    ``clock`` defaults to this host's for SQLite and to the database's for PostgreSQL (the one
    clock that every replica's leases are measured by).
    """
    # What both stores are opened with; each adds its own connection settings.
    common = {
        "read_only": read_only,
        "replica": replica,
        "lease_seconds": lease_seconds,
        "migrate": migrate,
    }
    if location.kind == "sqlite":
        from paygate.x402.ledger_sqlite import SqliteLedger

        assert location.path is not None
        return await SqliteLedger.open(location.path, clock=clock or time.time, **common)
    from paygate.x402.ledger_postgres import PostgresLedger

    assert location.conninfo is not None
    return await PostgresLedger.open(
        location.conninfo, password=location.password, clock=clock, pool_size=pool_size, **common
    )
