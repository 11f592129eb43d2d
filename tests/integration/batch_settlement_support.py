"""A chain-mode gateway that offers `batch-settlement`, the official SDK's batch-settlement
client, and a claimer of the gateway's channels working on the same ledger (as a second replica
would)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from paygate_dev.chain.constants import NETWORK
from pydantic import SecretStr
from x402 import x402Client
from x402.http.clients import x402HttpxClient
from x402.mechanisms.evm import EthAccountSigner
from x402.mechanisms.evm.batch_settlement.client import BatchSettlementEvmScheme
from x402.mechanisms.evm.batch_settlement.client.config import BatchSettlementEvmSchemeOptions

from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.schemes.batch_settlement.chain import BatchChain
from paygate.x402.schemes.batch_settlement.claims import Channels
from paygate.x402.schemes.batch_settlement.facilitator import BatchFacilitator, receiver_authorizer
from tests.integration.payment_support import paid_stack


def chain_batch(
    seller: str, ledger: Path | None, anvil: Any, gas_key: Any, **overrides: Any
) -> Any:
    settings: dict[str, Any] = {
        "payment_mode": "chain",
        "payment_schemes": ["batch-settlement"],
        "chain_rpc_url": anvil.rpc_url,
        "gas_key": gas_key.key if overrides.get("payment_mode", "chain") == "chain" else None,
        "batch_claim_interval": 3600.0,  # the tests claim when they choose (see claimer)
    }
    settings.update(overrides)
    facilitator_url = settings.pop("facilitator_url", None)
    return paid_stack(seller=seller, facilitator_url=facilitator_url, ledger=ledger, **settings)


def sdk_batch_scheme(payer: Any, *, deposit: int) -> BatchSettlementEvmScheme:
    """The SDK's batch-settlement client scheme, depositing ``deposit`` atomic units at once."""
    return BatchSettlementEvmScheme(
        EthAccountSigner(payer),
        BatchSettlementEvmSchemeOptions(deposit_strategy=lambda context: str(deposit)),
    )


def sdk_batch_client(scheme: BatchSettlementEvmScheme) -> x402HttpxClient:
    client = x402Client()
    client.register("eip155:*", scheme)
    return x402HttpxClient(client, timeout=30)


@contextlib.asynccontextmanager
async def claimer(
    ledger: Path | str,
    anvil: Any,
    gas_key: Any,
    *,
    replica: str = "claimer",
    max_per_claim: int = 100,
    facilitator_url: str | None = None,
) -> AsyncIterator[Channels]:
    """The gateway's channels, over its ledger (a SQLite path or a PostgreSQL URL), moved by
    the gas key or, given ``facilitator_url``, by that facilitator."""
    location = (
        LedgerLocation(kind="postgresql", conninfo=ledger)
        if isinstance(ledger, str)
        else LedgerLocation(kind="sqlite", path=ledger)
    )
    store = await open_ledger(location, replica=replica)
    session = aiohttp.ClientSession()
    try:
        key = None if facilitator_url else SecretStr(gas_key.key)
        chain = BatchChain(anvil.rpc_url, key, timeout=10.0, settle_timeout=30.0)
        mover: Any = chain
        authorizer = gas_key.address
        if facilitator_url:
            settler = FacilitatorSettler(
                session, facilitator_url, timeout=10.0, settle_timeout=30.0
            )
            mover = BatchFacilitator(settler, chain, NETWORK)
            authorizer = await receiver_authorizer(settler, NETWORK)
        yield Channels(
            store,  # type: ignore[arg-type]  # both stores have scheme_sql
            mover,
            receiver_authorizer=authorizer,
            replica=replica,
            withdraw_delay=900,
            pending_seconds=300.0,
            claim_interval=3600.0,
            max_per_claim=max_per_claim,
        )
    finally:
        await session.close()
        await store.close()
