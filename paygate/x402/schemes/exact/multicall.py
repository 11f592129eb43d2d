"""Chain mode, batched: several exact (EIP-3009) settlements in one Multicall3 transaction.

Payments due for settlement wait up to a short window (or until the batch is full) and go out
as ONE ``aggregate3`` call with ``allowFailure`` per call, so that one bad authorization (used,
expired, an empty wallet) does not sink the others. Each payment is then proven by its own logs
(:func:`proven_each`): the token's ``AuthorizationUsed(payer, nonce)`` followed by that call's
``Transfer(payer → payTo, value)`` — matched by authorizer and nonce, checked by amount and
recipient, never by position alone, and never one log for two payments.

Nothing here changes the settle-exactly-once rules: each payment is SETTLING in the ledger
before its batch is sent; if the process dies before the answers are recorded, reconcile reads
the chain by nonce (``authorizationState`` and the nonce's event) as for one settlement, and the
batch's receipt proves each payment as a single transaction's would.

It is the exact scheme's: its chain role hands it the payments when the settler's batching
options allow more than one per transaction, and it builds on what the settler lends
(:class:`~paygate.x402.schemes.base.ChainAccess`: the reader, the gas account, serialised
sending with a gas limit, waiting for a receipt) and on the one-by-one settlement of
:mod:`.chain`. One instance per settler (``ChainAccess.kept``), closed with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from eth_utils import to_checksum_address
from web3.exceptions import ContractLogicError

from paygate.x402 import smartwallet
from paygate.x402.evm import TRANSFER_TOPIC, address_word, hex_of, int_of
from paygate.x402.models import AnyPaymentPayload, SettleResponse
from paygate.x402.schemes.base import ChainAccess
from paygate.x402.schemes.exact.transfer import (
    EIP3009_ABI,
    USED_TOPIC,
    TransferFacts,
    prove,
    revert_reason,
    settle_one,
    transfer_call,
)
from paygate.x402.schemes.exact.verify import NONCE_USED, payload_of
from paygate.x402.settler import (
    ReviewRequired,
    SettlementSubject,
    SettlementUnknown,
    SettlerUnavailable,
)

log = logging.getLogger("paygate.x402")

# The same authorization twice in one batch: one log proves one payment, so the later ones are
# answered as a replay (the ledger never holds two records of one authorization).
DUPLICATE_IN_BATCH = NONCE_USED
# Gas when the strict estimate fails (the chain moved since the simulation): generous per call,
# as a call starved of gas fails alone under allowFailure and would only be retried by itself.
_GAS_BASE = 60_000
_GAS_PER_CALL = 150_000


def proven_each(receipt: Any, facts: Sequence[TransferFacts]) -> list[bool]:
    """For each payment in ``facts``: does ``receipt`` prove it by its own logs?

    A payment is proven by an ``AuthorizationUsed(payer, nonce)`` log of its token directly
    followed by a ``Transfer(payer → payTo, value)`` log of the same token (FiatToken emits the
    two back to back in one ``transferWithAuthorization``). A log proves at most one payment; a
    failed receipt proves none. Sans-IO: ``receipt`` is the JSON-RPC receipt as web3 returns it.
    """
    if receipt.get("status") != 1:
        return [False] * len(facts)
    logs = [
        (
            to_checksum_address(entry["address"]),
            [hex_of(topic) for topic in entry["topics"]],
            entry["data"],
        )
        for entry in receipt.get("logs") or ()
    ]
    used_logs: set[int] = set()
    answers = []
    for fact in facts:
        payer = address_word(fact.payer)
        pay_to = address_word(fact.pay_to)
        proven = False
        for index, (address, topics, _) in enumerate(logs[:-1]):
            if address != fact.token or topics != [USED_TOPIC, payer, fact.nonce.hex()]:
                continue
            following, moved, data = logs[index + 1]
            if (
                index not in used_logs
                and index + 1 not in used_logs
                and following == fact.token
                and moved == [TRANSFER_TOPIC, payer, pay_to]
                and int_of(data) == fact.value
            ):
                used_logs.update((index, index + 1))
                proven = True
            break  # one AuthorizationUsed per (payer, nonce) on a token: no other can match
        answers.append(proven)
    return answers


_ERROR_STRING = bytes.fromhex("08c379a0")  # Error(string)


def revert_message(data: bytes) -> str:
    """An ``Error(string)`` revert's message, read leniently (FiatToken's can carry dirty
    padding, which strict ABI decoding refuses); else the data as hex."""
    if data[:4] == _ERROR_STRING and len(data) >= 68:
        length = int.from_bytes(data[36:68], "big")
        if length <= len(data) - 68:
            return data[68 : 68 + length].decode("utf-8", "replace")
    return "0x" + data.hex()


@dataclass(eq=False)
class _Due:
    """One payment waiting for its batch, and where its answer goes."""

    payment: AnyPaymentPayload
    requirements: dict[str, Any]
    answer: asyncio.Future[SettleResponse]
    facts: TransferFacts = field(init=False)

    def __post_init__(self) -> None:
        self.facts = TransferFacts.of(self.payment, self.requirements)

    @property
    def key(self) -> tuple[str, str, bytes]:
        return (self.facts.token, self.facts.payer, self.facts.nonce)

    def give(self, response: SettleResponse) -> None:
        if not self.answer.done():
            self.answer.set_result(response)

    def fail(self, exc: BaseException) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc)


class ExactMulticall:
    """Collects exact settlements for up to ``chain.batching.window`` seconds or
    ``chain.batching.max`` payments and settles them in one Multicall3 ``aggregate3``
    transaction, each proven by its own logs; what a batch cannot carry (a wallet to deploy
    first, a chain without Multicall3) is settled one by one (:func:`.chain.settle_one`)."""

    def __init__(self, chain: ChainAccess) -> None:
        if chain.batching.max < 2:
            raise ValueError("a batch holds at least two payments")
        self._access = chain
        self._chain = chain.reader
        self._sender = to_checksum_address(chain.address)
        self._window = chain.batching.window
        self._max = chain.batching.max
        self._due: list[_Due] = []
        self._timer: asyncio.TimerHandle | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._multicall_code: bool | None = None
        self._closed = False
        self._multicall = chain.reader.w3.eth.contract(
            address=to_checksum_address(smartwallet.MULTICALL3_ADDRESS),
            abi=smartwallet.AGGREGATE3_ABI,
        )

    async def settle(
        self, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        """Settle ``payment`` in the next batch; the same answers as a single settlement."""
        try:
            deploys = smartwallet.parse_hex(payload_of(payment).signature).deployment is not None
        except ValueError:
            deploys = False  # malformed: the batch's own check answers it
        if deploys:
            # A counterfactual wallet is deployed and paid atomically in its own transaction.
            return await settle_one(self._access, payment, requirements)
        if self._closed:
            raise SettlerUnavailable("the gateway is stopping")
        due = _Due(payment, requirements, asyncio.get_running_loop().create_future())
        self._due.append(due)
        if len(self._due) >= self._max:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._window, self._flush)
        return await due.answer

    async def close(self) -> None:
        """Stop taking payments: the waiting ones are told nothing was done (their records stay
        owed and are settled by the reconciler); batches already sent run to their answer
        (the settler bounds the wait)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        waiting, self._due = self._due, []
        for due in waiting:
            due.fail(SettlerUnavailable("the gateway is stopping"))
        if self._running:
            await asyncio.wait(set(self._running))

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._due:
            batch, self._due = self._due[: self._max], self._due[self._max :]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Due]) -> None:
        try:
            await self._settle_batch([due for due in batch if not due.answer.done()])
        except (SettlementUnknown, SettlerUnavailable) as exc:
            for due in batch:
                due.fail(exc)
        except BaseException as exc:
            # Never leave a waiter hanging: an outcome unknown is reconciled by nonce.
            for due in batch:
                due.fail(SettlementUnknown(f"batch settlement failed: {type(exc).__name__}"))
            if not isinstance(exc, Exception):
                raise
            log.error("batch settlement failed: %s", type(exc).__name__)

    async def _settle_batch(self, batch: list[_Due]) -> None:
        if not batch:
            return
        try:
            sending = await self._prepare(batch)
        except (SettlementUnknown, SettlerUnavailable):
            raise
        except Exception as exc:  # an RPC's odd answer before anything was sent
            log.error("a settlement batch could not be prepared: %s", type(exc).__name__)
            raise SettlerUnavailable("the settlement batch could not be prepared") from None
        if not sending:
            return
        tx_hash = await self._send_batch([(target, data) for _, target, data in sending])
        receipt = await self._access.mined(tx_hash)
        dues = [due for due, _, _ in sending]
        proofs = proven_each(receipt, [due.facts for due in dues])
        log.info("batch settlement %s: %d of %d proven", tx_hash, sum(proofs), len(dues))
        for due, proven in zip(dues, proofs, strict=True):
            if proven:
                due.give(due.facts.settled(tx_hash))
            else:
                await self._answer_from_chain(due, tx_hash)

    async def _prepare(self, batch: list[_Due]) -> list[tuple[_Due, str, bytes]]:
        """The calls to send (target, calldata); every payment left out is answered here."""
        batch = [due for due in batch if await self._on_this_chain(due)]
        if not await self._has_multicall():
            for due in batch:  # a chain without Multicall3: one transaction each, as before
                await self._one_by_one(due)
            return []
        calls: list[tuple[_Due, str, bytes]] = []
        seen: set[tuple[str, str, bytes]] = set()
        for due in batch:
            if due.key in seen:
                due.give(due.facts.failed(DUPLICATE_IN_BATCH, ""))
                continue
            seen.add(due.key)
            try:
                calls.append((due, due.facts.token, self._calldata(due)))
            except ValueError:
                due.give(due.facts.failed("invalid_exact_evm_payload_signature", ""))
        simulated = await self._simulate([(target, data) for _, target, data in calls])
        sending: list[tuple[_Due, str, bytes]] = []
        for (due, target, data), (ok, raw) in zip(calls, simulated, strict=True):
            if ok:
                sending.append((due, target, data))
                continue
            reason = revert_reason(revert_message(raw))
            if reason == NONCE_USED:
                # Used since verify: by a transfer to us (paid) or a cancel (not): the chain says.
                await self._answer_from_chain(due, None)
            else:
                due.give(due.facts.failed(reason, ""))
        return sending

    async def _on_this_chain(self, due: _Due) -> bool:
        """Is ``due`` owed on the chain the endpoint serves? One paid on another of the offered
        networks fails alone (unsettled, left to the reconciler), never its whole batch."""
        try:
            await self._chain.check_chain(due.requirements)
        except SettlerUnavailable as exc:
            if self._chain.chain_id is None:
                raise  # the endpoint itself is unreachable: the whole batch waits
            due.fail(exc)
            return False
        return True

    async def _has_multicall(self) -> bool:
        """Is there code at Multicall3's canonical address (asked once)?"""
        if self._multicall_code is None:
            code = await self._chain.call(self._chain.w3.eth.get_code, self._multicall.address)
            self._multicall_code = bool(code)
            if not code:
                log.error("no Multicall3 at %s: settling one by one", self._multicall.address)
        return self._multicall_code

    async def _one_by_one(self, due: _Due) -> None:
        try:
            due.give(await settle_one(self._access, due.payment, due.requirements))
        except (SettlementUnknown, SettlerUnavailable) as exc:
            due.fail(exc)

    async def _answer_from_chain(self, due: _Due, tx_hash: str | None) -> None:
        """A payment its batch did not prove: the nonce's own event says what happened (a
        front-running transfer to us, a cancel); an unused nonce is settled by itself once."""
        try:
            subject = SettlementSubject(due.payment, due.requirements)
            due.give(await prove(self._chain, subject))
        except ReviewRequired as exc:
            due.fail(exc)  # used, its event out of reach: in doubt, for an operator
        except SettlerUnavailable:
            due.fail(SettlementUnknown("the chain is unavailable", transaction=tx_hash))
        except SettlementUnknown:
            # Its call failed inside the batch and nothing used the nonce (a call starved of
            # gas, a state change between simulation and mining): one settlement of its own.
            log.warning("a batched payment failed alone (in %s); settling it by itself", tx_hash)
            await self._one_by_one(due)

    def _calldata(self, due: _Due) -> bytes:
        """The token's ``transferWithAuthorization`` calldata for one payment (ValueError: a
        malformed signature)."""
        call = transfer_call(self._chain, due.payment, due.requirements)
        token = self._chain.w3.eth.contract(address=call.address, abi=EIP3009_ABI)
        return bytes.fromhex(token.encode_abi(call.signature, args=call.args).removeprefix("0x"))

    async def _simulate(self, calls: list[tuple[str, bytes]]) -> list[tuple[bool, bytes]]:
        """Each call's outcome in one ``eth_call`` of the whole batch, in order (each sees the
        state the calls before it leave, as in the transaction)."""
        if not calls:
            return []
        data = smartwallet.aggregate3_data((target, True, raw) for target, raw in calls)
        answer = await self._chain.call(
            self._chain.w3.eth.call,
            {"from": self._sender, "to": self._multicall.address, "data": "0x" + data.hex()},
        )
        return smartwallet.aggregate3_results(bytes(answer))

    async def _send_batch(self, calls: list[tuple[str, bytes]]) -> str:
        rows = [(to_checksum_address(target), True, raw) for target, raw in calls]
        strict = smartwallet.aggregate3_data((target, False, raw) for target, raw in calls)
        try:
            # allowFailure lets a call starved of gas fail quietly, so estimate as if every
            # call must succeed (they all did in the simulation).
            gas = await self._chain.call(
                self._chain.w3.eth.estimate_gas,
                {"from": self._sender, "to": self._multicall.address, "data": "0x" + strict.hex()},
            )
            gas = int(gas) * 6 // 5
        except ContractLogicError:
            gas = _GAS_BASE + _GAS_PER_CALL * len(calls)
        return await self._access.send(self._multicall.functions.aggregate3(rows), gas=gas)
