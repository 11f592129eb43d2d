"""The scheme registry: one package per scheme, one module per role, found by name or payload.

What a new scheme relies on (docs/ARCHITECTURE.md, "Payment schemes"): every registered scheme
provides each role from its own package, the client can import the registry without the
server-only roles, a payment is dispatched by its payload alone, and no code outside
``paygate/x402/schemes/`` branches on a scheme's name or payload type.
"""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import pytest
from eth_account import Account

from paygate.x402.models import PaymentPayload, PaymentPayloadV1, ResourceInfo
from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms
from paygate.x402.refusal import Refusal
from paygate.x402.schemes import SCHEMES, UnknownScheme, by_name, scheme_of
from paygate.x402.schemes.base import Binding, CheckTime, PaymentRejected
from paygate.x402.schemes.exact import client as exact_client
from paygate.x402.schemes.upto import client as upto_client
from paygate.x402.schemes.upto.offer import extra_for
from paygate.x402.verify import match_offer

ROOT = Path(__file__).resolve().parents[4]
ROLES = ("offer", "verify", "chain", "facilitator", "client")
PAYER = Account.create()
SELLER = Account.create().address
FACILITATOR = Account.create().address
SEPOLIA = resolve_network("base-sepolia")
RESOURCE = ResourceInfo(url="http://127.0.0.1/v1/chat/completions")
TERMS = PaymentTerms(
    pay_to=SELLER,
    accepted=(Acceptance(SEPOLIA, SEPOLIA.usdc),),  # type: ignore[arg-type]
    upto_extra={SEPOLIA.caip2: extra_for(FACILITATOR)},
)


def _exact() -> PaymentPayload:
    offer = TERMS.offers(Decimal("0.001"))[0]
    payload = exact_client.sign(
        PAYER,
        chain_id=SEPOLIA.chain_id,
        asset=offer.asset,
        pay_to=SELLER,
        amount=offer.amount,
        valid_for=60,
    )
    return PaymentPayload.model_validate(
        {"accepted": offer.v2().wire(), "payload": payload.wire(), "resource": RESOURCE.wire()}
    )


def _upto() -> PaymentPayload:
    offer = TERMS.upto_offers(Decimal("0.01"))[0]
    payload = upto_client.sign(
        PAYER,
        chain_id=SEPOLIA.chain_id,
        token=offer.asset.address,
        pay_to=SELLER,
        maximum=offer.amount,
        facilitator=FACILITATOR,
        valid_for=60,
    )
    return PaymentPayload.model_validate(
        {"accepted": offer.v2().wire(), "payload": payload.wire(), "resource": RESOURCE.wire()}
    )


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_each_registered_scheme_is_one_package_with_one_module_per_role(name: str) -> None:
    scheme = SCHEMES[name]
    assert scheme.name == name
    assert by_name(name) is scheme
    package = f"paygate.x402.schemes.{name.replace('-', '_')}"  # a module name: no hyphen
    for role in ROLES:
        module = importlib.import_module(f"{package}.{role}")
        assert hasattr(module, "ROLE"), (name, role)
    assert scheme.chain is importlib.import_module(f"{package}.chain").ROLE
    assert scheme.facilitator is importlib.import_module(f"{package}.facilitator").ROLE
    if scheme.binding_module is not None:  # the optional role, in the same package
        assert scheme.binding_module.startswith(f"{package}.")
        assert callable(importlib.import_module(scheme.binding_module).ROLE.bind)
    for role, calls in (
        (scheme.offer, ("accepts_amount", "requirements", "for_amount", "authorized_amount")),
        (scheme.verifier, ("check", "valid_before")),
        (scheme.chain, ("verify", "settle", "prove")),
        (scheme.facilitator, ("judge", "reconcile")),
        (scheme.client, ("decline", "cannot_sign", "sign")),
    ):
        assert all(callable(getattr(role, call, None)) for call in calls), (name, role)


def test_payload_types_tell_the_schemes_apart() -> None:
    types = [scheme.payload_type for scheme in SCHEMES.values()]
    assert len(set(types)) == len(types)
    assert scheme_of(_exact()) is SCHEMES["exact"]
    assert scheme_of(_upto()) is SCHEMES["upto"]
    assert by_name("batch-settlement ") is None
    assert by_name("EXACT") is None


def test_a_payload_of_no_registered_scheme_is_refused_by_the_registry() -> None:
    foreign = PaymentPayload.model_construct(accepted=_exact().accepted, payload=object())
    with pytest.raises(UnknownScheme):
        scheme_of(foreign)


def test_importing_the_registry_loads_no_server_role_until_a_settler_asks() -> None:
    code = (
        "import json, sys\n"
        "from paygate.x402.schemes import SCHEMES\n"
        "before = sorted(sys.modules)\n"
        "SCHEMES['upto'].facilitator\n"
        "print(json.dumps([before, sorted(sys.modules)]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    before, after = json.loads(result.stdout)
    server_only = ("web3", "x402", "aiohttp")
    assert not [m for m in before if m.split(".")[0] in server_only]
    assert not [m for m in before if m.endswith((".chain", ".facilitator"))]
    # Asked for, the role is there (and its chain proof with it, web3 included).
    assert "paygate.x402.schemes.upto.facilitator" in after
    assert "paygate.x402.schemes.upto.chain" in after
    assert "web3" in after


def test_a_v1_payment_naming_a_v2_only_scheme_is_refused_as_unsupported() -> None:
    # The side door: x402 v1's X-PAYMENT names its scheme at the top level, outside
    # `accepted`; a scheme whose offer role is v2-only must not be reachable through it.
    exact = _exact()
    offers = TERMS.offers(Decimal("0.001")) + TERMS.upto_offers(Decimal("0.01"))
    for name in ("upto", "batch-settlement"):
        v1 = PaymentPayloadV1(scheme=name, network=SEPOLIA.name, payload=exact.payload)  # type: ignore[arg-type]
        with pytest.raises(PaymentRejected) as info:
            match_offer(v1, offers)
        assert info.value.reason == "unsupported_scheme"
    v1 = PaymentPayloadV1(scheme="exact", network=SEPOLIA.name, payload=exact.payload)  # type: ignore[arg-type]
    assert match_offer(v1, offers).scheme == "exact"


def test_a_payment_checked_under_another_schemes_offer_is_refused() -> None:
    # An upto payload echoing an exact offer (or the reverse) fails the matched scheme's check.
    exact, upto = _exact(), _upto()
    now = int(time.time())
    for payment, other in ((exact, "upto"), (upto, "exact")):
        offers = TERMS.offers(Decimal("0.001")) + TERMS.upto_offers(Decimal("0.01"))
        offer = next(o for o in offers if o.scheme == other)
        with pytest.raises(PaymentRejected) as info:
            SCHEMES[other].check(payment, offer, CheckTime(now, 5, 0))
        assert info.value.reason == "invalid_payload"


# Branches on a scheme outside its package that are known and named in docs/ARCHITECTURE.md
# ("Payment schemes"): the offers built per scheme, the facilitator's upto address read at
# start, the settings' checks and the attested payment terms. No new one may appear (a scheme
# with its own offers, operations or background work answers Scheme's hooks instead).
KNOWN_BRANCHES = {
    "paygate/x402/processor.py": 2,  # PaymentProcessor.offers
    "paygate/x402/offers.py": 1,  # the v1 body lists exact offers only
    "paygate/server/assembly.py": 2,  # upto_terms
    "paygate/server/attestation.py": 1,  # the attested upto facilitator
    "paygate/client/terms.py": 3,  # offers held against the attested terms
    "paygate/config.py": 1,  # upto needs token_prices
}


def _scheme_branches(tree: ast.AST) -> int:
    names = {"exact", "upto", "batch-settlement"}
    payloads = {"ExactEvmPayload", "UptoEvmPayload", "BatchSettlementPayload"}

    def named(node: ast.AST) -> bool:
        return (isinstance(node, ast.Constant) and node.value in names) or (
            isinstance(node, ast.Name) and node.id in {"EXACT", "UPTO"}
        )

    def branch(node: ast.AST) -> bool:
        if isinstance(node, ast.Compare):
            return any(named(side) for side in (node.left, *node.comparators))
        return (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "isinstance"
            and any(isinstance(n, ast.Name) and n.id in payloads for n in ast.walk(node))
        )

    return sum(1 for node in ast.walk(tree) if branch(node))


def test_no_code_outside_the_scheme_packages_branches_on_a_scheme() -> None:
    found = {}
    for path in sorted((ROOT / "paygate").rglob("*.py")):
        relative = str(path.relative_to(ROOT))
        if relative.startswith("paygate/x402/schemes/"):
            continue
        count = _scheme_branches(ast.parse(path.read_text(), filename=relative))
        if count:
            found[relative] = count
    assert found == KNOWN_BRANCHES


async def test_a_scheme_without_a_binding_role_binds_as_itself_and_its_hooks_do_nothing() -> None:
    # The hooks the processor and the assembly call on every scheme: exact and upto add no
    # offers, no operation, no correction and no background work.
    binding = Binding(ledger=None, settler=None, replica="r", network="eip155:84532", settings=None)  # type: ignore[arg-type]
    exact = _exact()
    offer = TERMS.offers(Decimal("0.001"))[0]
    for name in ("exact", "upto"):
        scheme = SCHEMES[name]
        assert scheme.binding_module is None
        assert await scheme.bind(binding) is scheme
        assert scheme.own_offers(TERMS, price=Decimal("0.001"), maximum=Decimal("0.01")) == ()
        assert await scheme.operation(exact, offer) is None
        refusal = Refusal(402, "payment_required", "payment required")
        assert await scheme.corrective(refusal, exact) is refusal
        assert scheme.tasks() == ()
    # batch-settlement's binding role lives in its own package (server-only, loaded lazily).
    assert (
        SCHEMES["batch-settlement"].binding_module == "paygate.x402.schemes.batch_settlement.bound"
    )
