"""Chain mode for `batch-settlement` (server-only, web3): deposits, batched claims, refunds.

The gateway's gas account relays every transaction to the x402BatchSettlement contract and its
key is the channels' receiver authorizer (it signs ``ClaimBatch`` and ``Refund``). Nothing
counts until the chain proves it:

* a deposit: a successful receipt carrying the token's ``Transfer`` of the amount into the
  settlement contract, then the channel's balance read back;
* a claim: one ``multicall`` transaction — ``claimWithSignature`` of every channel's latest
  voucher and ``settle(receiver, token)`` — proven by its receipt's ``Settled`` event and each
  channel's ``totalClaimed`` read back at or above what was claimed (a claim at or below the
  on-chain total is a no-op, so a claim sent twice never pays twice);
* a refund: ``refundWithSignature`` (after claiming what was charged, in the same multicall),
  proven by the receipt and the balance read back.

web3 is synchronous: each call runs in a worker thread under a time-out (``ChainReader.call``);
sends are serialised so the gas account's nonces never collide within this process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from eth_abi import encode as abi_encode
from eth_account import Account
from eth_utils import keccak, to_checksum_address
from pydantic import SecretStr
from web3.exceptions import BlockNotFound, ContractLogicError, Web3RPCError

from paygate.x402 import evm
from paygate.x402.chain_reader import ChainReader
from paygate.x402.evm import abi_function, abi_tuple, members
from paygate.x402.models import AnyPaymentPayload, SettleResponse, VerifyResponse
from paygate.x402.schemes.base import ChainAccess
from paygate.x402.schemes.batch_settlement import channel as ch
from paygate.x402.schemes.batch_settlement.payload import BatchSettlementPayload, ChannelConfig
from paygate.x402.schemes.batch_settlement.store import ClaimEntry, Stamp
from paygate.x402.settler import SettlementSubject, SettlerUnavailable

log = logging.getLogger("paygate.x402")

_CONFIG = abi_tuple("config", ch.CHANNEL_CONFIG)
_CLAIMS = abi_tuple(
    "voucherClaims",
    [
        abi_tuple(
            "voucher",
            [abi_tuple("channel", ch.CHANNEL_CONFIG), *members("uint128 maxClaimableAmount")],
        ),
        *members("bytes signature, uint128 totalClaimed"),
    ],
    array=True,
)


# What paygate calls and reads (the x402 SDK 2.25's ABI of x402BatchSettlement, in part).
SETTLEMENT_ABI: list[dict[str, Any]] = [
    abi_function(
        "deposit", [_CONFIG, *members("uint128 amount, address collector, bytes collectorData")]
    ),
    abi_function("claimWithSignature", [_CLAIMS, *members("bytes authorizerSignature")]),
    abi_function("settle", members("address receiver, address token")),
    abi_function(
        "refundWithSignature",
        [_CONFIG, *members("uint128 amount, uint256 nonce, bytes receiverAuthorizerSignature")],
    ),
    abi_function("multicall", members("bytes[] data"), ["bytes[]"]),
    abi_function(
        "channels", members("bytes32 channelId"), ["uint128", "uint128"], mutability="view"
    ),
    abi_function("refundNonce", members("bytes32 channelId"), ["uint256"], mutability="view"),
    abi_function(
        "pendingWithdrawals",
        members("bytes32 channelId"),
        ["uint128", "uint40"],
        mutability="view",
    ),
]
# keccak256 of the contract's Settled and Refunded events, as log topics (hex without 0x).
_SETTLED = keccak(text="Settled(address,address,address,uint128)").hex()
_REFUNDED = keccak(text="Refunded(bytes32,address,uint128)").hex()
# The events that start, end or change a payer's timed withdrawal (channel id: the first indexed
# topic of each): its request, its finish, and a refund or deposit (a refund lowers or cancels
# a pending withdrawal; the x402 spec lets a deposit cancel one).
WITHDRAW_REQUESTED = keccak(text="WithdrawInitiated(bytes32,uint128,uint40)").hex()
WITHDRAWN = keccak(text="Withdrawn(bytes32,uint128)").hex()
_WITHDRAW_MOVES = (
    WITHDRAW_REQUESTED,
    WITHDRAWN,
    _REFUNDED,
    keccak(text="Deposited(bytes32,address,uint128,uint128)").hex(),
)
# A channel reading's tries at a block the answering node lacks (a load-balanced RPC's node
# behind the one that named the block), and the pause before asking one block again.
_READ_TRIES = 4
_READ_PAUSE = 0.25


class LogsBehind(SettlerUnavailable):
    """The node that answered a range's events lacks its last block (a load-balanced RPC's
    node behind): the events are not all there. Asked again at the next pass."""

    message = "the chain's RPC node answering the events is behind"
    code = "settler_logs_behind"


@dataclass(frozen=True, slots=True)
class OnChain:
    """A channel as the contract held it at ``block`` (its place in chain order), the block
    whose hash is ``block_hash`` (None: not known) and timestamp ``block_time``."""

    balance: int
    total_claimed: int
    block: int
    block_hash: str | None = None
    block_time: int = 0

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.block, self.block_hash, self.block_time)


def config_tuple(config: ChannelConfig) -> tuple[Any, ...]:
    return (
        to_checksum_address(config.payer),
        to_checksum_address(config.payer_authorizer),
        to_checksum_address(config.receiver),
        to_checksum_address(config.receiver_authorizer),
        to_checksum_address(config.token),
        config.withdraw_delay,
        bytes.fromhex(config.salt[2:]),
    )


@dataclass(frozen=True, slots=True)
class Deposit:
    """A payer's deposit into a channel: the payment (wire dict) and requirement it came with."""

    payment: dict[str, Any]
    requirements: dict[str, Any]
    payload: BatchSettlementPayload
    channel_id: str


@dataclass(frozen=True, slots=True)
class Refund:
    """A cooperative refund of ``amount`` to the payer, after claiming what was charged
    (``claim``, None when everything charged is claimed already)."""

    config: ChannelConfig
    channel_id: str
    amount: int
    claim: ClaimEntry | None
    voucher: dict[str, Any]  # the payer's refund voucher, as it came
    requirements: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Head:
    """The newest block: its number and timestamp (the chain's clock), and its hash."""

    block: int
    timestamp: int
    hash: str | None = None

    @property
    def stamp(self) -> Stamp:
        return Stamp(self.block, self.hash, self.timestamp)


@dataclass(frozen=True, slots=True)
class Pending:
    """A payer's timed withdrawal pending on chain (amount 0: none)."""

    amount: int
    requested_at: int


class ChannelChain(Protocol):
    """Who moves a channel's money: the gateway's own gas account (:class:`BatchChain`) or a
    facilitator (``facilitator.BatchFacilitator``); both prove every move on chain."""

    async def state(self, channel_id: str, *, since: int = 0) -> OnChain:
        """The channel on chain, read at a block no older than ``since``."""
        ...

    async def deposit(self, deposit: Deposit) -> OnChain: ...

    async def send_claim(self, entries: list[ClaimEntry]) -> str: ...

    async def proven_claim(self, tx_hash: str | None, entries: tuple[ClaimEntry, ...]) -> bool: ...

    async def refund(self, refund: Refund) -> tuple[str, OnChain, int]:
        """(the refund's transaction hash, the channel after it, what came back to the payer)."""
        ...

    async def head(self) -> Head: ...

    async def withdrawal_moves(self, first: int, last: int) -> list[tuple[str, str]]:
        """(channel id, event topic) of the contract's withdrawal-moving events in blocks
        ``first``..``last``, any receiver's."""
        ...

    async def pending_withdrawal(self, channel_id: str, block: int) -> Pending: ...

    async def stamp(self, block: int) -> Stamp | None:
        """Block ``block`` as the chain holds it now (None: the node lacks it)."""
        ...

    async def orphaned(self, stamp: Stamp) -> bool:
        """The chain no longer holds the block ``stamp`` names (a reorganisation): proven, not
        guessed (see :meth:`BatchChain.orphaned`)."""
        ...


def sweeps(entries: list[ClaimEntry]) -> list[tuple[str, str]]:
    """The (receiver, token) pairs whose claimed funds a claim of ``entries`` sweeps, in order."""
    return sorted(
        {
            (to_checksum_address(e.config.receiver), to_checksum_address(e.config.token))
            for e in entries
        }
    )


async def claimed_on_chain(
    chain: ChannelChain, entries: tuple[ClaimEntry, ...], *, since: int = 0
) -> bool:
    """Every channel's on-chain ``totalClaimed`` reached its entry's total (read at a block
    no older than ``since``: the claim's own, when known)."""
    for entry in entries:
        if (await chain.state(entry.channel_id, since=since)).total_claimed < entry.total:
            return False
    return True


class BatchChain:
    """The settlement contract behind ``rpc_url``, driven by the gas account of ``gas_key``
    (read-only without one: a facilitator's moves are proven with it)."""

    def __init__(
        self,
        rpc_url: str,
        gas_key: SecretStr | None,
        *,
        timeout: float,
        settle_timeout: float,
        send: Callable[[Any], Awaitable[str]] | None = None,
    ) -> None:
        self._reader = ChainReader(rpc_url, timeout=timeout)
        # The chain settler's send when it shares our gas account: one lock and one nonce
        # sequence for every scheme's transactions (two would race for the same nonce).
        self._shared_send = send
        self._account = Account.from_key(gas_key.get_secret_value()) if gas_key else None
        self._contract = self._reader.w3.eth.contract(
            address=to_checksum_address(ch.SETTLEMENT_ADDRESS), abi=SETTLEMENT_ABI
        )
        self._settle_timeout = settle_timeout
        self._send_lock = asyncio.Lock()

    @property
    def address(self) -> str:
        """The relayer and receiver authorizer."""
        return str(self._signer.address)

    @property
    def _signer(self) -> Any:
        if self._account is None:
            raise SettlerUnavailable("no gas key: this chain client only reads")
        return self._account

    async def chain_id(self) -> int:
        return await self._reader.served_chain()

    async def state(self, channel_id: str, *, since: int = 0) -> OnChain:
        """The channel at the newest block, read at that block's number: readings reach the
        ledger out of order, and its number says which is newer. Never read at a block older
        than ``since`` (a transaction's own: a reading after it must show it, even when the
        node naming the newest block is behind the one that mined it).

        The reading is made at the block's hash (EIP-1898), as the block's header names it,
        and stamped with both: a node that reorganised between the two answers has no such
        block and is asked again, so a reading is always of the block its stamp names (the
        ledger tells a block reorganised away from a newer one by it: readings.py).

        Behind a load-balanced RPC the number and the read may be answered by different
        nodes, the reader behind: it answers an error for a block it lacks (geth "header not
        found", anvil ``BlockOutOfRange``). The block before is read then (an older reading,
        stamped as such, is still right in chain order), down to ``since``, where the same
        block is asked again after a pause; SettlerUnavailable after ``_READ_TRIES``."""
        read = self._contract.functions.channels(bytes.fromhex(channel_id[2:])).call
        newest = int(await self._reader.call(lambda: self._reader.w3.eth.block_number))
        block = max(newest, since)
        for _ in range(_READ_TRIES):
            stamp = await self.stamp(block)
            found = None if stamp is None else await self._reader.call(_read_at, read, stamp.hash)
            if stamp is not None and found is not None:
                return OnChain(int(found[0]), int(found[1]), block, stamp.hash, stamp.time)
            if block > since:
                block -= 1
            else:
                await asyncio.sleep(_READ_PAUSE)
        raise SettlerUnavailable("the chain's RPC endpoint lacks the blocks it names")

    async def stamp(self, block: int) -> Stamp | None:
        """Block ``block`` as the node holds it: its number, hash and timestamp (None: the
        node lacks it)."""
        header = await self._reader.call(_header, self._reader.w3, block)
        if header is None:
            return None
        return Stamp(block, "0x" + evm.hex_of(header["hash"]), int(header["timestamp"]))

    async def orphaned(self, stamp: Stamp) -> bool:
        """The chain no longer holds the block ``stamp`` names: reorganised away, or a test
        chain reset. A node that lacks the block is no proof — behind a load-balanced RPC a
        node behind lacks it too, and would make a newer reading look orphaned. Proof is:

        * the node holds another block at that number (its chain forked from the stamp's), or
        * the node's newest block is below that number and later in time than the stamp's
          block: a node behind has an ancestor of the stamp's block as its newest, never a
          later one, so its chain is another (one that fell back, and went on from there).

        A chain that fell back and has made no block since proves nothing yet (its newest
        block is older than the stamp's): its next block does. Unknown hash: never."""
        if stamp.hash is None:
            return False
        now = await self.stamp(stamp.block)
        if now is not None:
            return now.hash != stamp.hash
        head = await self.head()
        return head.block < stamp.block and stamp.time > 0 and head.timestamp > stamp.time

    # --- withdrawals (withdrawals.py) ---

    async def head(self) -> Head:
        block = await self._reader.call(lambda: self._reader.w3.eth.get_block("latest"))
        return Head(int(block["number"]), int(block["timestamp"]), "0x" + evm.hex_of(block["hash"]))

    async def withdrawal_moves(self, first: int, last: int) -> list[tuple[str, str]]:
        """The withdrawal-moving events of blocks ``first`` to ``last``: (channel id, topic).

        A node behind may answer a range past its newest block with the events up to it and
        no error (anvil does; clients vary): the scan would move its place past
        events never returned — a payer's withdrawal request never learnt. So the range's
        last block is asked in the same JSON-RPC batch (one request: a balancer sends it to
        one node), and :class:`LogsBehind` raised when that node lacks it."""
        params = {
            "address": to_checksum_address(ch.SETTLEMENT_ADDRESS),
            "fromBlock": first,
            "toBlock": last,
            "topics": [["0x" + t for t in _WITHDRAW_MOVES]],
        }
        logs = await self._reader.call(_logs_to, self._reader.w3, params, last)
        if logs is None:
            raise LogsBehind(f"the node answering eth_getLogs lacks block {last}")
        moves = []
        for log_ in logs:
            topics = [evm.hex_of(t) for t in log_["topics"]]
            if len(topics) >= 2 and topics[0] in _WITHDRAW_MOVES:
                moves.append(("0x" + topics[1], topics[0]))
        return moves

    async def pending_withdrawal(self, channel_id: str, block: int) -> Pending:
        read = self._contract.functions.pendingWithdrawals(bytes.fromhex(channel_id[2:])).call
        for _ in range(_READ_TRIES):
            found = await self._reader.call(_read_at, read, block)
            if found is not None:
                return Pending(int(found[0]), int(found[1]))
            await asyncio.sleep(_READ_PAUSE)
        raise SettlerUnavailable("the chain's RPC endpoint lacks the blocks it names")

    # --- deposits ---

    def _deposit_call(self, payload: BatchSettlementPayload) -> Any:
        deposit = payload.deposit
        assert deposit is not None
        assert deposit.authorization.erc3009_authorization is not None
        auth = deposit.authorization.erc3009_authorization
        data = abi_encode(
            ["uint256", "uint256", "uint256", "bytes"],
            [
                int(auth.valid_after),
                int(auth.valid_before),
                int(auth.salt, 16),
                bytes.fromhex(auth.signature[2:]),
            ],
        )
        return self._contract.functions.deposit(
            config_tuple(payload.channel_config),
            int(deposit.amount),
            to_checksum_address(ch.ERC3009_COLLECTOR_ADDRESS),
            data,
        )

    async def deposit(self, deposit: Deposit) -> OnChain:
        """Simulate, send and prove the deposit; the channel's state after it. ValueError
        (an x402 reason) when the chain refuses it; SettlementUnknown when no receipt came."""
        call = self._deposit_call(deposit.payload)
        tx_hash = await self._sent(call, "invalid_batch_settlement_evm_deposit_simulation_failed")
        return await self.proven_deposit(tx_hash, deposit)

    async def proven_deposit(self, tx_hash: str, deposit: Deposit) -> OnChain:
        """The deposit's proof: its receipt moved the amount into the settlement contract."""
        receipt = await self.receipt(tx_hash)
        payload = deposit.payload
        assert payload.deposit is not None
        if not _moved_in(receipt, payload.channel_config.token, int(payload.deposit.amount)):
            raise ValueError("invalid_batch_settlement_evm_deposit_transaction_failed")
        return await self.state(deposit.channel_id, since=int(receipt["blockNumber"]))

    # --- claims ---

    def _claim_calls(self, entries: list[ClaimEntry], chain_id: int) -> list[bytes]:
        signature = ch.sign_claim_batch(
            self._signer,
            [(e.channel_id, e.max_claimable, e.total) for e in entries],
            chain_id,
        )
        rows = [
            (
                (config_tuple(e.config), e.max_claimable),
                bytes.fromhex(e.signature[2:]),
                e.total,
            )
            for e in entries
        ]
        claim = self._contract.encode_abi(
            "claimWithSignature", args=[rows, bytes.fromhex(signature[2:])]
        )
        settles = [self._contract.encode_abi("settle", args=list(pair)) for pair in sweeps(entries)]
        return [bytes.fromhex(c[2:]) for c in (claim, *settles)]

    async def send_claim(self, entries: list[ClaimEntry]) -> str:
        """Send one transaction claiming ``entries`` and sweeping to the receivers: its hash."""
        calls = self._claim_calls(entries, await self.chain_id())
        multicall = self._contract.functions.multicall(calls)
        return await self._sent(multicall, "the claim would revert")

    async def proven_claim(self, tx_hash: str | None, entries: tuple[ClaimEntry, ...]) -> bool:
        """The claim's proof: its receipt succeeded with a ``Settled`` event (when the hash
        is known), and every channel's on-chain ``totalClaimed`` reached its entry's total."""
        if tx_hash is not None:
            receipt = await self.receipt(tx_hash)
            contract = to_checksum_address(ch.SETTLEMENT_ADDRESS)
            settled = any(
                log_["topics"]
                and evm.hex_of(log_["topics"][0]) == _SETTLED
                and to_checksum_address(log_["address"]) == contract
                for log_ in receipt["logs"]
            )
            if receipt["status"] != 1 or not settled:
                return False
            return await claimed_on_chain(self, entries, since=int(receipt["blockNumber"]))
        return await claimed_on_chain(self, entries)

    # --- refunds ---

    async def refund(self, refund: Refund) -> tuple[str, OnChain, int]:
        """Claim what was charged (if anything is unclaimed) and refund ``amount`` in one
        transaction: (its hash, the channel after it, what came back to the payer)."""
        chain_id = await self.chain_id()
        channel_id, amount = refund.channel_id, refund.amount
        nonce = await self.refund_nonce(channel_id)
        signature = ch.sign_refund(self._signer, channel_id, nonce, amount, chain_id)
        data = self._contract.encode_abi(
            "refundWithSignature",
            args=[config_tuple(refund.config), amount, nonce, bytes.fromhex(signature[2:])],
        )
        calls = [bytes.fromhex(data[2:])]
        if refund.claim is not None:
            calls = self._claim_calls([refund.claim], chain_id) + calls
        multicall = self._contract.functions.multicall(calls)
        tx_hash = await self._sent(
            multicall, "invalid_batch_settlement_evm_refund_simulation_failed"
        )
        receipt = await self.receipt(tx_hash)
        if receipt["status"] != 1:
            raise ValueError("invalid_batch_settlement_evm_refund_transaction_failed")
        after = await self.state(channel_id, since=int(receipt["blockNumber"]))
        return tx_hash, after, refunded_in(receipt, channel_id)

    async def refund_nonce(self, channel_id: str) -> int:
        raw = bytes.fromhex(channel_id[2:])
        return int(await self._reader.call(self._contract.functions.refundNonce(raw).call))

    # --- sending ---

    async def _sent(self, call: Any, reverted: str) -> str:
        """``call`` sent once an ``eth_call`` of it passes: its hash; ValueError(``reverted``,
        the revert its cause) when it would revert."""
        try:
            await self._reader.call(call.call, {"from": self.address})
        except ContractLogicError as exc:
            raise ValueError(reverted) from exc
        async with self._send_lock:
            if self._shared_send is not None:
                return await self._shared_send(call)
            return await self._reader.send(self._signer, call, chain_id=await self.chain_id())

    async def receipt(self, tx_hash: str) -> Any:
        return await self._reader.mined(tx_hash, self._settle_timeout)


def refunded_in(receipt: Any, channel_id: str) -> int:
    """What the receipt's ``Refunded`` events of the channel returned to the payer (0: none,
    a refund that moved nothing). The transaction's own word: two balance readings around it
    could be made at blocks another move sits between (a top-up; a node behind naming one)."""
    contract = to_checksum_address(ch.SETTLEMENT_ADDRESS)
    returned = 0
    for log_ in receipt["logs"]:
        topics = [evm.hex_of(t) for t in log_["topics"]]
        if (
            to_checksum_address(log_["address"]) == contract
            and len(topics) == 3
            and topics[0] == _REFUNDED
            and topics[1] == channel_id[2:].lower()
        ):
            returned += evm.int_of(log_["data"])
    return returned


def _read_at(read: Callable[..., Any], block: int | str) -> Any:
    """``read`` (a view call) at ``block`` (a number or a block hash); None when the node
    answered an error for it (one that lacks the block: see :meth:`BatchChain.state`)."""
    try:
        return read(block_identifier=block)
    except Web3RPCError:
        return None


def _logs_to(w3: Any, params: dict[str, Any], last: int) -> Any:
    """``eth_getLogs`` of ``params`` batched with block ``last``'s header (one node answers
    both); None when that node lacks the block (its logs would stop short of it)."""
    try:
        with w3.batch_requests() as batch:
            batch.add(w3.eth.get_block(last))
            batch.add(w3.eth.get_logs(params))
            header, logs = batch.execute()
    except BlockNotFound:
        return None
    return None if header is None else logs


def _header(w3: Any, block: int) -> Any:
    """Block ``block``'s header as the node holds it; None when it lacks the block."""
    try:
        return w3.eth.get_block(block)
    except (BlockNotFound, Web3RPCError):
        return None


def _moved_in(receipt: Any, token: str, amount: int) -> bool:
    """The receipt succeeded and the token moved ``amount`` into the settlement contract."""
    if receipt["status"] != 1:
        return False
    to = evm.address_word(ch.SETTLEMENT_ADDRESS)
    for log_ in receipt["logs"]:
        topics = [evm.hex_of(t) for t in log_["topics"]]
        if (
            to_checksum_address(log_["address"]) == to_checksum_address(token)
            and len(topics) == 3
            and topics[0] == evm.TRANSFER_TOPIC
            and topics[2] == to
            and evm.int_of(log_["data"]) == amount
        ):
            return True
    return False


class BatchSettlementChain:
    """The settler's chain role. A channel payment never reaches a settler: the bound scheme
    (:mod:`.bound`) verifies and commits it against the channel, and :class:`BatchChain` moves
    the money. Asked anyway (the scheme was not bound at start), it is unavailable: never
    served, never settled."""

    async def verify(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> VerifyResponse:
        raise not_bound()

    async def settle(
        self, chain: ChainAccess, payment: AnyPaymentPayload, requirements: dict[str, Any]
    ) -> SettleResponse:
        raise not_bound()

    async def prove(self, reader: ChainReader, subject: SettlementSubject) -> SettleResponse:
        raise not_bound()


def not_bound(message: str = "batch-settlement is not set up on this gateway") -> Exception:
    return SettlerUnavailable(message)


ROLE = BatchSettlementChain()
