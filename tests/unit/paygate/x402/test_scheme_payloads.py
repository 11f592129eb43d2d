"""Each scheme's payload model lives in its own package and is registered there: the shared
wire models (``paygate/x402/models.py``) name no scheme, and a payment's payload is read as the
model of the scheme it names — so a new scheme touches no shared model."""

from __future__ import annotations

import ast
import base64
import json
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from paygate import jsonsafe
from paygate.x402 import codec
from paygate.x402.models import PaymentPayload, PaymentPayloadV1, payload_model, register_payload
from paygate.x402.networks import resolve_network
from paygate.x402.offers import Acceptance, PaymentTerms
from paygate.x402.schemes import SCHEMES
from paygate.x402.schemes.base import PaymentRejected
from paygate.x402.verify import match_offer

ROOT = Path(__file__).resolve().parents[4]
MODELS = ROOT / "paygate" / "x402" / "models.py"
ADDRESS = "0x" + "ab" * 20
SIGNATURE = "0x" + "12" * 65
BYTES32 = "0x" + "11" * 32
# One well-formed payload per registered scheme, in wire names (a new scheme adds its own).
SAMPLES: dict[str, dict[str, Any]] = {
    "exact": {
        "signature": SIGNATURE,
        "authorization": {
            "from": ADDRESS,
            "to": ADDRESS,
            "value": "1000",
            "validAfter": "0",
            "validBefore": "9999999999",
            "nonce": BYTES32,
        },
    },
    "upto": {
        "signature": SIGNATURE,
        "permit2Authorization": {
            "from": ADDRESS,
            "permitted": {"token": ADDRESS, "amount": "5000"},
            "spender": ADDRESS,
            "nonce": "7",
            "deadline": "9999999999",
            "witness": {"to": ADDRESS, "facilitator": ADDRESS, "validAfter": "0"},
        },
    },
    "batch-settlement": {
        "type": "deposit",
        "channelConfig": {
            "payer": ADDRESS,
            "payerAuthorizer": ADDRESS,
            "receiver": ADDRESS,
            "receiverAuthorizer": ADDRESS,
            "token": ADDRESS,
            "withdrawDelay": 900,
            "salt": BYTES32,
        },
        "voucher": {"channelId": BYTES32, "maxClaimableAmount": "5000", "signature": SIGNATURE},
        "deposit": {
            "amount": "100000",
            "authorization": {
                "erc3009Authorization": {
                    "validAfter": "0",
                    "validBefore": "9999999999",
                    "salt": BYTES32,
                    "signature": SIGNATURE,
                }
            },
        },
    },
}
SEPOLIA = resolve_network("base-sepolia")


def _v2(scheme: str, payload: Any) -> dict[str, Any]:
    accepted = {
        "scheme": scheme,
        "network": SEPOLIA.caip2,
        "asset": SEPOLIA.usdc.address,
        "amount": "1000",
        "payTo": ADDRESS,
        "maxTimeoutSeconds": 300,
    }
    return {"x402Version": 2, "accepted": accepted, "payload": payload}


def _header(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document).encode()).decode()


def test_the_shared_wire_models_name_no_scheme() -> None:
    source = MODELS.read_text()
    tree = ast.parse(source)
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [
        a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names
    ]
    assert not [m for m in imported if m.startswith("paygate.x402.schemes")]
    for name, scheme in SCHEMES.items():
        assert not re.search(rf"\b{re.escape(name)}\b", source, re.IGNORECASE), name
        assert scheme.payload_type.__name__ not in source, name


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_each_scheme_registers_its_payload_from_its_own_package(name: str) -> None:
    model = payload_model(name)
    assert model is SCHEMES[name].payload_type
    package = SCHEMES[name].chain_module.rsplit(".", 1)[0]
    assert model.__module__ == f"{package}.payload"


def test_every_registered_scheme_has_a_sample() -> None:
    assert set(SAMPLES) == set(SCHEMES)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_each_schemes_payload_round_trips_through_the_header(name: str) -> None:
    payment = codec.decode_payment(_header(_v2(name, SAMPLES[name])), header="PAYMENT-SIGNATURE")
    assert isinstance(payment, PaymentPayload)
    assert type(payment.payload) is SCHEMES[name].payload_type
    assert payment.wire()["payload"] == SAMPLES[name]
    again = codec.decode_payment(codec.encode(payment), header="PAYMENT-SIGNATURE")
    assert again == payment
    assert codec.parse_payment(payment.wire(), header="ledger") == payment


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_a_payments_json_is_made_once_and_is_its_wire_forms(name: str) -> None:
    # The ledger stores it and the facilitator's bodies embed it: the bytes of ``wire()``.
    payment = codec.decode_payment(_header(_v2(name, SAMPLES[name])), header="PAYMENT-SIGNATURE")
    made = payment.wire_json()
    assert made == jsonsafe.dumps_compact(payment.wire())
    assert payment.wire_json() is made  # kept, not made again
    # Not a field: never compared, dumped or carried into a changed copy.
    fresh = codec.decode_payment(_header(_v2(name, SAMPLES[name])), header="PAYMENT-SIGNATURE")
    assert fresh == payment
    assert payment == fresh
    assert "wire_json" not in json.dumps(payment.wire())
    changed = payment.model_copy(update={"extensions": {"x": {"info": {}}}})
    assert json.loads(changed.wire_json())["extensions"] == {"x": {"info": {}}}
    assert payment.wire_json() is made


# What a caller may put in a payment's extensions, as the header's JSON parser reads it: any
# text (non-ASCII, U+2028, escapes), integers past 64 bits, floats of every magnitude.
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(st.dictionaries(st.text(), _JSON, max_size=4))
def test_a_payments_json_is_the_bytes_of_its_wire_form_whatever_its_extensions(
    extensions: dict[str, Any],
) -> None:
    # Written by pydantic's JSON serialiser: the document jsonsafe.dumps_compact makes of
    # ``wire()`` (the ledger's payload, parsed back by recovery, and the facilitator's
    # bodies), byte for byte but where that fell back to ``json.dumps`` (an integer past 64
    # bits), whose output escapes what is not printable ASCII.
    document = {**_v2("exact", SAMPLES["exact"]), "extensions": extensions}
    payment = codec.parse_payment(json.loads(json.dumps(document)), header="PAYMENT-SIGNATURE")
    made, before = payment.wire_json(), jsonsafe.dumps_compact(payment.wire())
    assert json.loads(made) == json.loads(before)
    assert codec.parse_payment(json.loads(made), header="ledger") == payment
    try:
        orjson.dumps(payment.wire())
    except TypeError:  # past 64 bits: json.dumps wrote it
        return
    assert made == before


def test_a_v1_payments_json_is_its_wire_forms() -> None:
    v1 = {"x402Version": 1, "scheme": "exact", "network": "base-sepolia"}
    v1["payload"] = SAMPLES["exact"]
    payment = codec.decode_payment(_header(v1), header="X-PAYMENT")
    assert isinstance(payment, PaymentPayloadV1)
    assert payment.wire_json() == jsonsafe.dumps_compact(payment.wire())
    assert json.loads(payment.wire_json()) == v1


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_a_payload_of_another_scheme_is_an_unreadable_header(name: str) -> None:
    # The side door: a scheme's name with another scheme's payload (or one that fits several
    # shapes) is read as the named scheme's model only, never as whichever fits.
    for other, payload in SAMPLES.items():
        if other == name:
            continue
        with pytest.raises(codec.PaymentHeaderError) as info:
            codec.decode_payment(_header(_v2(name, payload)), header="PAYMENT-SIGNATURE")
        assert info.value.code == "invalid_payment_header"
        assert "payload" in str(info.value)
    merged = {**SAMPLES["exact"], **SAMPLES["upto"]}
    payment = codec.decode_payment(_header(_v2("exact", merged)), header="PAYMENT-SIGNATURE")
    assert type(payment.payload) is SCHEMES["exact"].payload_type


@pytest.mark.parametrize("scheme", ["foo", "EXACT", "exact ", ""])
def test_an_unknown_scheme_is_refused_as_unsupported_not_as_unreadable(scheme: str) -> None:
    terms = PaymentTerms(pay_to=ADDRESS, accepted=(Acceptance(SEPOLIA, SEPOLIA.usdc),))  # type: ignore[arg-type]
    payment = codec.decode_payment(
        _header(_v2(scheme, SAMPLES["exact"])), header="PAYMENT-SIGNATURE"
    )
    with pytest.raises(PaymentRejected) as info:
        match_offer(payment, terms.offers(Decimal("0.001")))
    assert info.value.reason == "unsupported_scheme"
    # ... and a payload of no known scheme under an unknown name is unreadable, as before.
    with pytest.raises(codec.PaymentHeaderError):
        codec.decode_payment(_header(_v2(scheme, {"x": 1})), header="PAYMENT-SIGNATURE")


def test_x402_v1_reads_only_the_payloads_registered_for_v1() -> None:
    v1 = {"x402Version": 1, "network": SEPOLIA.name}
    payment = codec.parse_payment(
        {**v1, "scheme": "exact", "payload": SAMPLES["exact"]}, header="X"
    )
    assert isinstance(payment, PaymentPayloadV1)
    assert type(payment.payload) is SCHEMES["exact"].payload_type
    for name in set(SCHEMES) - {"exact"}:
        # A v2-only scheme's payload is not read through v1's X-PAYMENT at all.
        with pytest.raises(codec.PaymentHeaderError):
            codec.parse_payment({**v1, "scheme": name, "payload": SAMPLES[name]}, header="X")


def test_a_scheme_cannot_be_given_a_second_payload_model() -> None:
    with pytest.raises(ValueError, match="already has a payload model"):
        register_payload("exact", SCHEMES["upto"].payload_type)
    assert payload_model("exact") is SCHEMES["exact"].payload_type
    register_payload("exact", SCHEMES["exact"].payload_type, v1=True)  # the same: a no-op
    assert payload_model("exact", version=1) is SCHEMES["exact"].payload_type
    assert payload_model("upto", version=1) is None


def test_the_codec_knows_every_scheme_whoever_imported_it_first() -> None:
    # A process that reads payments through the codec alone (a bench, a recovery tool) must not
    # depend on someone else having imported the scheme registry.
    code = (
        "from paygate.x402 import codec\n"
        "from paygate.x402.models import payload_model\n"
        f"print(all(payload_model(n) is not None for n in {sorted(SCHEMES)!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
