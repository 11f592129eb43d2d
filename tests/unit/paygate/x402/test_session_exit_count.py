"""A metered request's exit that has to count the completion with the engine's tokenizer (the
caller went away before the engine's usage arrived) keeps that count's own time bound.

The tokenizer count bounds itself with ``asyncio.timeout``, which acts on the task that entered
it. An exit run in the request's own task up to its first wait (tried for speed in session 24,
then taken back) entered it there: its expiry cancelled the request's task (already leaving)
instead of the count, and the count went on unbounded, the payment never metered. The exit runs
in a shielded task of its own from its first step."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from pathlib import Path

import aiohttp

from paygate.x402.facilitator import FacilitatorSettler
from paygate.x402.ledger_store import LedgerLocation, open_ledger
from paygate.x402.metering import Quote, TokenCounts, TokenPrice
from paygate.x402.processor import PaymentProcessor
from paygate.x402.results import PaymentAdmission
from paygate.x402.schemes import SCHEMES
from paygate.x402.session import MeteredTerms, PaymentSession
from paygate.x402.settlement import VerifyOnly
from tests.fixtures.ledger_support import request
from tests.fixtures.x402_support import terms


class BoundedCounter:
    """The engine's tokenizer as paygate.server.counting.Tokenizer uses it: its calls bounded
    by ``asyncio.timeout`` (entered before its first wait); here the engine never answers."""

    def __init__(self, bound: float) -> None:
        self.bound = bound
        self.timed_out = asyncio.Event()

    async def usage(self, completion: str, prompt_bound: int) -> TokenCounts | None:
        try:
            async with asyncio.timeout(self.bound):
                await asyncio.get_running_loop().create_future()  # never answered
        except TimeoutError:
            self.timed_out.set()
        return None


class CutReply:
    """A metered stream cut short: no usage, no running counts, some text delivered."""

    usage = None
    running_usage = None
    completion_text = "half a sentence"
    bytes_seen = 120


async def test_a_caller_gone_exit_counts_within_the_tokenizer_s_own_bound(
    tmp_path: Path,
) -> None:
    ledger = await open_ledger(LedgerLocation(kind="sqlite", path=tmp_path / "payments.db"))
    try:
        record = await ledger.reserve(**request(1))
        async with aiohttp.ClientSession() as http:
            settler = FacilitatorSettler(http, "http://127.0.0.1:9", timeout=1, settle_timeout=1)
            processor = PaymentProcessor(
                terms=terms(), ledger=ledger, settler=settler, settlement=VerifyOnly()
            )
            # Settled elsewhere already (``finished``): this exit only meters the reply.
            admission = PaymentAdmission(
                price=Decimal("0.001"), record=record, scheme=SCHEMES["upto"], finished=True
            )
            quote = Quote(
                model="m",
                price=TokenPrice(Decimal(1), Decimal(1)),
                prompt_bound=10,
                max_tokens=10,
                maximum=Decimal("0.001"),
                body=b"{}",
                strip_usage=False,
            )
            session = PaymentSession(
                admission,
                settlements=processor.settlements,
                terms=MeteredTerms(quote=quote),
                decimals=6,
            )
            counter = session.counter = BoundedCounter(0.05)
            reply = CutReply()
            session.watch(reply, reply)
            replying = asyncio.Event()

            async def handler() -> None:
                async with session:
                    session.status = 200
                    replying.set()
                    await asyncio.sleep(30)  # the caller goes away here

            task = asyncio.get_running_loop().create_task(handler())
            await asyncio.wait_for(replying.wait(), timeout=5)
            task.cancel()
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), timeout=5)
            # The count timed out by its own bound, and the reply was metered (the fallback).
            await asyncio.wait_for(counter.timed_out.wait(), timeout=5)
            for _ in range(100):  # the exit's last steps, after the count
                if admission.meter is not None:
                    break
                await asyncio.sleep(0.01)
            assert admission.meter is not None
            assert admission.meter.source.startswith("fallback")
            await settler.close()
    finally:
        await ledger.close()
