"""A payment's JSON (``wire_json``: what the ledger stores and the facilitator's /verify and
/settle bodies embed) is the same bytes whichever paygate version wrote it: the documents below
are pinned to what the version before pydantic wrote them (orjson over ``wire()``) gave, for
each scheme and version the official SDK sends, with extensions (payment-identifier, bazaar),
non-ASCII text, escapes and numbers at and past 64 bits. Nothing compares a stored payload
byte-wise today (retries match on the fingerprint, recovery parses it); these keep it so that
one that does, or a facilitator that hashes its body, sees no change across an upgrade."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from paygate import jsonsafe
from paygate.x402 import codec

ADDRESS = "0x" + "ab" * 20
SIGNATURE = "0x" + "12" * 65
BYTES32 = "0x" + "11" * 32
USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
EXACT = {
    "signature": SIGNATURE,
    "authorization": {
        "from": ADDRESS,
        "to": ADDRESS,
        "value": "1000",
        "validAfter": "0",
        "validBefore": "9999999999",
        "nonce": BYTES32,
    },
}
UPTO = {
    "signature": SIGNATURE,
    "permit2Authorization": {
        "from": ADDRESS,
        "permitted": {"token": USDC, "amount": "5000"},
        "spender": ADDRESS,
        "nonce": "7",
        "deadline": "9999999999",
        "witness": {"to": ADDRESS, "facilitator": ADDRESS, "validAfter": "0"},
    },
}
VOUCHER = {
    "type": "voucher",
    "channelConfig": {
        "payer": ADDRESS,
        "payerAuthorizer": ADDRESS,
        "receiver": ADDRESS,
        "receiverAuthorizer": ADDRESS,
        "token": USDC,
        "withdrawDelay": 900,
        "salt": BYTES32,
    },
    "voucher": {"channelId": BYTES32, "maxClaimableAmount": "5000", "signature": SIGNATURE},
}


def v2(scheme: str, payload: dict[str, Any], **more: Any) -> dict[str, Any]:
    accepted = {
        "scheme": scheme,
        "network": "eip155:84532",
        "amount": "1000",
        "asset": USDC,
        "payTo": ADDRESS,
        "maxTimeoutSeconds": 300,
        "extra": {"name": "USDC", "version": "2"},
    }
    return {"x402Version": 2, "accepted": accepted, "payload": payload, **more}


# name: (header, document as the SDK sends it, the bytes stored before the upgrade)
DOCUMENTS: dict[str, tuple[str, dict[str, Any], bytes]] = {
    "v1-exact": (
        "X-PAYMENT",
        {"x402Version": 1, "scheme": "exact", "network": "base-sepolia", "payload": EXACT},
        (
            b'{"x402Version":1,"scheme":"exact","network":"base-sepolia","payload":{"signature":"0x'
            b"1212121212121212121212121212121212121212121212121212121212121212121212121212121212121"
            b'212121212121212121212121212121212121212121212","authorization":{"from":"0xabababababa'
            b'babababababababababababababab","to":"0xabababababababababababababababababababab","val'
            b'ue":"1000","validAfter":"0","validBefore":"9999999999","nonce":"0x1111111111111111111'
            b'111111111111111111111111111111111111111111111"}}}'
        ),
    ),
    "v2-upto": (
        "PAYMENT-SIGNATURE",
        v2("upto", UPTO),
        (
            b'{"x402Version":2,"accepted":{"scheme":"upto","network":"eip155:84532","amount":"1000"'
            b',"asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0xabababababababababab'
            b'abababababababababab","maxTimeoutSeconds":300,"extra":{"name":"USDC","version":"2"}},'
            b'"payload":{"permit2Authorization":{"from":"0xabababababababababababababababababababab'
            b'","permitted":{"token":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","amount":"5000"},'
            b'"spender":"0xabababababababababababababababababababab","nonce":"7","deadline":"999999'
            b'9999","witness":{"to":"0xabababababababababababababababababababab","facilitator":"0xa'
            b'bababababababababababababababababababab","validAfter":"0"}},"signature":"0x1212121212'
            b"1212121212121212121212121212121212121212121212121212121212121212121212121212121212121"
            b'21212121212121212121212121212121212"}}'
        ),
    ),
    "v2-batch-voucher": (
        "PAYMENT-SIGNATURE",
        v2("batch-settlement", VOUCHER),
        (
            b'{"x402Version":2,"accepted":{"scheme":"batch-settlement","network":"eip155:84532","am'
            b'ount":"1000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0xabababab'
            b'abababababababababababababababab","maxTimeoutSeconds":300,"extra":{"name":"USDC","ver'
            b'sion":"2"}},"payload":{"type":"voucher","channelConfig":{"payer":"0xababababababababa'
            b'bababababababababababab","payerAuthorizer":"0xabababababababababababababababababababa'
            b'b","receiver":"0xabababababababababababababababababababab","receiverAuthorizer":"0xab'
            b'ababababababababababababababababababab","token":"0x036CbD53842c5426634e7929541eC2318f'
            b'3dCF7e","withdrawDelay":900,"salt":"0x11111111111111111111111111111111111111111111111'
            b'11111111111111111"},"voucher":{"channelId":"0x111111111111111111111111111111111111111'
            b'1111111111111111111111111","maxClaimableAmount":"5000","signature":"0x121212121212121'
            b"2121212121212121212121212121212121212121212121212121212121212121212121212121212121212"
            b'121212121212121212121212121212"}}}'
        ),
    ),
    "v2-exact-extensions": (
        "PAYMENT-SIGNATURE",
        v2(
            "exact",
            EXACT,
            resource={
                "url": "https://example.test/v1/chat/completions",
                "description": "Résumé — 東京 ✓",
                "mimeType": "application/json",
            },
            extensions={
                "payment-identifier": {"info": {"id": "pay_0123456789abcdef", "required": False}},
                "bazaar": {
                    "info": {
                        "input": {
                            "type": "http",
                            "method": "POST",
                            "body": {
                                "prompt": 'naïve "q"\n\t\u2028 😀',
                                "n": 18446744073709551615,
                                "big": 18446744073709551616,
                                "f": 0.1,
                                "e": 1e16,
                                "z": None,
                            },
                        }
                    },
                    "schema": {"type": "object"},
                },
            },
        ),
        (
            b'{"x402Version":2,"resource":{"url":"https://example.test/v1/chat/completions","descri'
            b'ption":"R\xc3\xa9sum\xc3\xa9 \xe2\x80\x94 \xe6\x9d\xb1\xe4\xba\xac \xe2\x9c\x93","mim'
            b'eType":"application/json"},"accepted":{"scheme":"exact","network":"eip155:84532","amo'
            b'unt":"1000","asset":"0x036CbD53842c5426634e7929541eC2318f3dCF7e","payTo":"0xababababa'
            b'bababababababababababababababab","maxTimeoutSeconds":300,"extra":{"name":"USDC","vers'
            b'ion":"2"}},"payload":{"signature":"0x121212121212121212121212121212121212121212121212'
            b'1212121212121212121212121212121212121212121212121212121212121212121212121212121212","'
            b'authorization":{"from":"0xabababababababababababababababababababab","to":"0xababababa'
            b'bababababababababababababababab","value":"1000","validAfter":"0","validBefore":"99999'
            b'99999","nonce":"0x1111111111111111111111111111111111111111111111111111111111111111"}}'
            b',"extensions":{"payment-identifier":{"info":{"id":"pay_0123456789abcdef","required":f'
            b'alse}},"bazaar":{"info":{"input":{"type":"http","method":"POST","body":{"prompt":"na'
            b'\xc3\xafve \\"q\\"\\n\\t\xe2\x80\xa8 \xf0\x9f\x98\x80","n":18446744073709551615,"big"'
            b':1.8446744073709552e+19,"f":0.1,"e":1e+16,"z":null}}},"schema":{"type":"object"}}}}'
        ),
    ),
}


def _header(document: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(document, ensure_ascii=False).encode()).decode()


@pytest.mark.parametrize("name", sorted(DOCUMENTS))
def test_a_payments_json_is_the_bytes_the_previous_version_stored(name: str) -> None:
    header, document, stored = DOCUMENTS[name]
    payment = codec.decode_payment(_header(document), header=header)
    assert payment.wire_json() == stored
    # What recovery reads back from the ledger is the same payment, written the same again.
    again = codec.parse_payment(json.loads(stored), header="ledger")
    assert again == payment
    assert again.wire_json() == stored


# Anything JSON in a header's extensions: integers up to and past 64 bits (the header's parser
# reads those as floats), floats, any text (escapes, U+2028, astral characters).
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=10,
)


@given(st.dictionaries(st.text(), _JSON, max_size=3), st.text())
def test_whatever_a_header_carries_its_json_is_the_bytes_orjson_gave(
    extensions: dict[str, Any], description: str
) -> None:
    # No exception for integers past 64 bits: a header never yields one (orjson reads it as a
    # float), so the standard library's escaping fallback never wrote a received payment.
    document = v2("exact", EXACT, extensions=extensions)
    document["resource"] = {"url": "https://example.test/", "description": description}
    payment = codec.decode_payment(_header(document), header="PAYMENT-SIGNATURE")
    assert payment.wire_json() == jsonsafe.dumps_compact(payment.wire())


@pytest.mark.parametrize("deep", [False, True])
def test_a_changed_copy_never_carries_the_originals_json(deep: bool) -> None:
    header, document, stored = DOCUMENTS["v2-exact-extensions"]
    payment = codec.decode_payment(_header(document), header=header)
    assert payment.wire_json() == stored  # made and kept on the original
    changed = payment.model_copy(update={"extensions": None, "resource": None}, deep=deep)
    assert "extensions" not in json.loads(changed.wire_json())
    assert changed.wire_json() == jsonsafe.dumps_compact(changed.wire())
    assert payment.wire_json() == stored
