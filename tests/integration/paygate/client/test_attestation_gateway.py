"""Attestation end to end: the real gateway on a TPM key (swtpm with EK certificates from a local
CA), the real client with an AttestationPolicy, the OpenAI SDK on top, x402 payments on anvil
through the SDK facilitator.

The genuine appliance is attested and then paid; every refusal has its own code, and in every
refusal nothing was sealed (the model server saw no request) and nothing was paid (no payment
signed, balances unchanged). The middlebox is an httpx transport that really relays to the
gateway and rewrites what passes, as an on-path attacker would.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from paygate_dev.stack import Swtpm

from enclave import SoftwareKey
from enclave.keys.tpm import TpmKey
from paygate.client import (
    AsyncPaygateTransport,
    AttestationPolicy,
    ClientError,
    PaygateTransport,
    SpendPolicy,
)
from paygate.client.attestation import Attested, Exchange, attestation_flow
from tests.fixtures.attestation_support import (
    TAMPER_CASES,
    Middlebox,
    edit_evidence,
    ollama_models_dir,
    tamper_for,
)
from tests.fixtures.chain import PAYER_FUNDS
from tests.fixtures.gateway_support import Stack, ThreadedStack
from tests.fixtures.payment_support import PRICE_ATOMIC, paid_settings
from tests.fixtures.swtpm import EkCa

MODEL = "fake-llama:latest"
WEIGHTS = b"fake-llama weights"
DIGEST = "sha256:" + hashlib.sha256(WEIGHTS).hexdigest()
MESSAGES = [{"role": "user", "content": "hello attested appliance"}]
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])


@pytest.fixture(scope="module")
def tpm_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[TpmKey]:
    tpm = ek_swtpm_factory(ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path_factory.mktemp("tpm") / "key") as key:
        yield key


@pytest.fixture(scope="module")
def rogue_key(
    ek_swtpm_factory: Callable[[EkCa], Swtpm], rogue_ek_ca: EkCa, tmp_path_factory: Any
) -> Iterator[TpmKey]:
    """A TPM whose EK certificates come from a CA no policy here trusts."""
    tpm = ek_swtpm_factory(rogue_ek_ca)
    with TpmKey.generate(tpm.tcti, tmp_path_factory.mktemp("rogue") / "key") as key:
        yield key


def _gateway(
    key: Any,
    facilitator: Any,
    seller: str,
    tmp_path: Path,
    *,
    require_encryption: bool = True,
    **extra: Any,
) -> ThreadedStack:
    settings = paid_settings(
        seller=seller,
        facilitator_url=facilitator.url,
        ledger=tmp_path / f"ledger-{id(key)}.db",
        require_encryption=require_encryption,
        key_backend="tpm" if isinstance(key, TpmKey) else "software",
        # The weights' digest the ollama profile computes at start (and checks), then binds.
        upstream_model_path=ollama_models_dir(tmp_path / "models", "fake-llama", "latest", WEIGHTS),
        expected_model_digests={MODEL: DIGEST},
        **{
            "attestation_rate_per_minute": 100_000,
            "attestation_global_rate_per_minute": 100_000,
            **extra,
        },  # one address attests throughout
    )
    return ThreadedStack(key=key, **settings)


@pytest.fixture
def stack(tpm_key: TpmKey, facilitator: Any, seller: str, tmp_path: Path) -> Iterator[Stack]:
    with _gateway(tpm_key, facilitator, seller, tmp_path) as running:
        yield running


def _policy(ek_ca: EkCa, seller: str, **changes: Any) -> AttestationPolicy:
    options: dict[str, Any] = {"model_digests": {DIGEST}, "pay_to": seller}
    options.update(changes)
    return AttestationPolicy.from_files(ek_ca.chain_pem, **options)


def _openai(url: str, transport: httpx.BaseTransport) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=30),
    )


def _nothing_sealed_or_paid(
    stack: Stack, usdc: Any, payer: Any, seller: str, transport: Any
) -> None:
    assert stack.fake.hits == {} or sum(stack.fake.hits.values()) == 0
    assert transport.payments == []
    assert usdc.balance_of(payer.address) == PAYER_FUNDS
    assert usdc.balance_of(seller) == 0


def _refused(stack_url: str, transport: PaygateTransport, code: str) -> ClientError:
    client = _openai(stack_url, transport)
    with pytest.raises(ClientError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
    error = caught.value
    assert error.code == code, (error.code, str(error))
    return error


def test_attested_gateway_then_sealed_paid_requests_through_the_openai_sdk(
    stack: Stack, ek_ca: EkCa, usdc: Any, payer: Any, seller: str
) -> None:
    transport = PaygateTransport(wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller))
    client = _openai(stack.url, transport)
    for _ in range(2):
        completion = client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        assert completion.choices[0].message.content
    attested = transport.attested(stack.url)
    assert attested is not None
    assert attested.kind == "tpm"
    names = [c.name for c in attested.checks if c.status == "pass"]
    assert names == [
        "evidence_form", "nonce", "freshness", "ek_chain", "ak", "activation", "quote",
        "app_pcr", "certify_sealing_key", "certify_receipt_key", "key_document", "models",
        "pay_to",
    ]  # fmt: skip
    assert attested.binding.sealing_key == stack.key.public_key
    # The replica that answered: by default <hostname>:<pid> (the stack runs in this process).
    assert attested.binding.replica == f"{socket.gethostname()}:{os.getpid()}"
    assert usdc.balance_of(seller) == 2 * PRICE_ATOMIC  # attested once, paid twice


def _drive(flow: Generator[Exchange, tuple[int, bytes], Attested]) -> Attested:
    """Answer the client's attestation exchanges over HTTP until it returns its verdict."""
    with httpx.Client(timeout=10) as http:
        exchange = next(flow)
        for _ in range(8):  # evidence, then one credential activation
            answer = http.request(exchange.method, exchange.url, content=exchange.body)
            try:
                exchange = flow.send((answer.status_code, answer.content))
            except StopIteration as done:
                return done.value
    raise AssertionError("the attestation flow did not finish")


def test_evidence_names_the_replica_that_answered(
    tpm_key: TpmKey, facilitator: Any, seller: str, tmp_path: Path, ek_ca: EkCa
) -> None:
    with _gateway(tpm_key, facilitator, seller, tmp_path, replica_id="eu-1.w0") as stack:
        response = httpx.get(f"{stack.url}/v1/attestation?nonce={'ab' * 32}", timeout=10)
        assert response.status_code == 200
        document = response.json()
        assert document["replica"] == "eu-1.w0"  # unsigned, beside the evidence
        assert document["binding"]["replica"] == "eu-1.w0"  # and bound by the quote
        # The client's verification passes with the replica bound, and reports it.
        flow = attestation_flow(stack.url, _policy(ek_ca, seller), stack.key.public_key)
        attested = _drive(flow)
        assert attested.binding.replica == "eu-1.w0"


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("key_document_swapped", "key_not_certified"),
        ("evidence_key_swapped", "quote_invalid"),
        ("old_nonce", "nonce_mismatch"),
        ("certify_of_another_key", "key_not_certified"),
        ("duplicable_key_certified", "key_not_certified"),
        ("evidence_deeply_nested", "evidence_malformed"),
        ("evidence_without_tpm_part", "evidence_malformed"),
        ("wrong_model_digest", "model_not_accepted"),
        ("wrong_pay_to", "pay_to_mismatch"),
        ("pcr_mismatch", "pcr_mismatch"),
    ],
)
def test_refusals_seal_and_pay_nothing(
    stack: Stack,
    tpm_key: TpmKey,
    ek_ca: EkCa,
    usdc: Any,
    payer: Any,
    seller: str,
    case: str,
    code: str,
) -> None:
    policy = _policy(ek_ca, seller)
    tamper = tamper_for(case, stack.url, tpm_key) if case in TAMPER_CASES else None
    if case == "wrong_model_digest":
        policy = _policy(ek_ca, seller, model_digests={"sha256:" + "00" * 32})
    elif case == "wrong_pay_to":
        policy = _policy(ek_ca, seller, pay_to="0x" + "12" * 20)
    elif case == "pcr_mismatch":
        policy = _policy(ek_ca, seller, pcrs={0: b"\x11" * 32})
    transport = PaygateTransport(
        transport=Middlebox(tamper) if tamper else None,
        wallet=payer,
        spend=SPEND,
        attestation=policy,
    )
    _refused(stack.url, transport, code)
    _nothing_sealed_or_paid(stack, usdc, payer, seller, transport)


def test_quote_from_a_tpm_whose_ek_is_not_under_the_trusted_ca(
    rogue_key: TpmKey, facilitator: Any, ek_ca: EkCa, usdc: Any, payer: Any, seller: str,
    tmp_path: Path,
) -> None:  # fmt: skip
    with _gateway(rogue_key, facilitator, seller, tmp_path) as rogue:
        transport = PaygateTransport(wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller))
        _refused(rogue.url, transport, "ek_untrusted")
        _nothing_sealed_or_paid(rogue, usdc, payer, seller, transport)


def test_ak_that_fails_credential_activation(
    stack: Stack, rogue_key: TpmKey, facilitator: Any, ek_ca: EkCa, usdc: Any, payer: Any,
    seller: str, tmp_path: Path,
) -> None:  # fmt: skip
    """The rogue appliance's evidence (its AK, quote, certifications) under the genuine TPM's
    EK certificates: the chain passes, the AK is well formed, but only the genuine TPM could
    open the credential, and the rogue one is asked to."""
    genuine = httpx.get(f"{stack.url}/v1/attestation?nonce={'cd' * 32}", timeout=10).json()

    def splice(document: dict[str, Any]) -> None:
        document["tpm"]["ek_certificates"] = genuine["tpm"]["ek_certificates"]

    with _gateway(rogue_key, facilitator, seller, tmp_path) as rogue:
        transport = PaygateTransport(
            transport=Middlebox(edit_evidence(splice), reroute=rogue.url),
            wallet=payer,
            spend=SPEND,
            attestation=_policy(ek_ca, seller),
        )
        _refused(stack.url, transport, "activation_failed")
        _nothing_sealed_or_paid(stack, usdc, payer, seller, transport)
        assert sum(rogue.fake.hits.values()) == 0


def test_software_key_is_unattested_unless_allowed(
    facilitator: Any, ek_ca: EkCa, usdc: Any, payer: Any, seller: str, tmp_path: Path
) -> None:
    with _gateway(SoftwareKey.generate(), facilitator, seller, tmp_path) as software:
        transport = PaygateTransport(wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller))
        _refused(software.url, transport, "unattested")
        _nothing_sealed_or_paid(software, usdc, payer, seller, transport)
        allowed = PaygateTransport(
            wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller, allow_unattested=True)
        )
        reply = _openai(software.url, allowed).chat.completions.create(
            model=MODEL,
            messages=MESSAGES,  # type: ignore[arg-type]
        )
        assert reply.choices[0].message.content
        attested = allowed.attested(software.url)
        assert attested is not None
        assert attested.kind == "none"


def test_bad_attestation_requests_get_stable_codes(stack: Stack) -> None:
    for query, code in (
        ("", "invalid_nonce"),
        ("?nonce=zz", "invalid_nonce"),
        ("?nonce=" + "0" * 63, "invalid_nonce"),
        (f"?nonce={'00' * 32}&nonce={'11' * 32}", "invalid_nonce"),
    ):
        response = httpx.get(f"{stack.url}/v1/attestation{query}", timeout=10)
        assert response.status_code == 400
        assert response.headers["X-Paygate-Error"] == code
    for body, code in (
        (b"not json", "invalid_activation"),
        (json.dumps({"ek": "p384", "credential_blob": "", "encrypted_secret": ""}).encode(),
         "invalid_activation"),
        (json.dumps({"ek": "p256", "credential_blob": "AAAA", "encrypted_secret": "AAAA"}).encode(),
         "invalid_activation"),
        (b"x" * 20_000, "invalid_activation"),
        (b"[" * 8000 + b"]" * 8000, "invalid_activation"),
    ):  # fmt: skip
        response = httpx.post(f"{stack.url}/v1/attestation/activate", content=body, timeout=10)
        assert response.status_code == 400, response.text
        assert response.headers["X-Paygate-Error"] == code


def test_signed_receipts_on_whole_and_streamed_replies(
    stack: Stack, ek_ca: EkCa, payer: Any, seller: str
) -> None:
    """v2 whole and v1 (the header, sealed to the caller), v2 SSE stream (inside the final
    frame), v2 NDJSON (the done object): each receipt verifies under the attested key and
    names this payment."""
    for envelope in ("v2", "v1"):
        transport = PaygateTransport(
            envelope=envelope, wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller)
        )
        client = _openai(stack.url, transport)
        client.chat.completions.create(model=MODEL, messages=MESSAGES)  # type: ignore[arg-type]
        claims = transport.last_signed_receipt
        assert claims is not None
        assert claims["model"] == MODEL
        assert claims["model_digest"] == DIGEST
        assert claims["usage"]["completion_tokens"] > 0  # as the model server stated it
        payment = claims["payment"]
        assert payment["payer"] == payer.address
        assert payment["pay_to"] == seller
        assert payment["scheme"] == "exact"
        assert payment["authorized"] == payment["charged"] == str(PRICE_ATOMIC)
        assert transport.last_payment is not None
        assert payment["id"] == transport.last_payment.nonce.lower()  # the authorization signed
        assert payment["transaction"].startswith("0x")
        assert claims["usage"]["source"] == "reported"
        if envelope == "v2":
            chunks = client.chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
                stream=True,
            )
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert text
            streamed = transport.last_signed_receipt
            assert streamed is not None
            assert streamed is not claims
            assert streamed["payment"]["transaction"].startswith("0x")
    with httpx.Client(transport=transport, timeout=30) as raw:
        body = {"model": MODEL, "messages": MESSAGES, "stream": True}
        with raw.stream("POST", f"{stack.url}/api/chat", json=body) as response:
            lines = [line for line in response.iter_lines() if line]
        claims = response.extensions["paygate_receipt"].claims
        assert claims is not None
        assert json.loads(lines[-1])["done"] is True
        # Read from the stream's final object as the model server stated it.
        assert claims["usage"]["completion_tokens"] == json.loads(lines[-1])["eval_count"]


@pytest.mark.parametrize(
    ("case", "code"),
    [("tampered", "receipt_invalid"), ("other_reply", "receipt_mismatch")],
)
def test_bad_receipts_raise(
    tpm_key: TpmKey, facilitator: Any, ek_ca: EkCa, payer: Any, seller: str, tmp_path: Path,
    case: str, code: str,
) -> None:  # fmt: skip
    """A plaintext paid gateway (so the middlebox can change the reply without breaking a
    seal): a receipt with a flipped signature byte, and a genuine receipt on a changed reply."""
    from paygate.client import ReceiptInvalid

    def tamper(headers: dict[str, str], body: bytes) -> tuple[dict[str, str], bytes]:
        name = next(k for k in headers if k.lower() == "x-paygate-receipt")
        if case == "tampered":
            token = headers[name]
            headers[name] = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
            return headers, body
        return headers, body.replace(b"fake", b"FAKE", 1)

    with _gateway(tpm_key, facilitator, seller, tmp_path, require_encryption=False) as plain:
        transport = PaygateTransport(
            transport=Middlebox(reply=tamper),
            envelope="plain",
            wallet=payer,
            spend=SPEND,
            attestation=_policy(ek_ca, seller),
        )
        with pytest.raises(ReceiptInvalid) as caught:
            _openai(plain.url, transport).chat.completions.create(
                model=MODEL,
                messages=MESSAGES,  # type: ignore[arg-type]
            )
        assert caught.value.code == code
        assert transport.last_signed_receipt is None


def test_a_request_for_a_model_without_an_accepted_digest_is_not_sealed(
    stack: Stack, ek_ca: EkCa, usdc: Any, payer: Any, seller: str
) -> None:
    transport = PaygateTransport(wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller))
    client = _openai(stack.url, transport)
    with pytest.raises(ClientError) as caught:
        client.chat.completions.create(model="other-model", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.code == "model_not_accepted"
    _nothing_sealed_or_paid(stack, usdc, payer, seller, transport)
    assert transport.attested(stack.url) is not None  # attested; only this model is refused


async def test_async_transport_attests_then_pays_and_checks_receipts(
    stack: Stack, ek_ca: EkCa, usdc: Any, payer: Any, seller: str
) -> None:
    transport = AsyncPaygateTransport(wallet=payer, spend=SPEND, attestation=_policy(ek_ca, seller))
    client = openai.AsyncOpenAI(
        base_url=stack.url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, timeout=30),
    )
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        stream=True,
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text
    claims = transport.last_signed_receipt
    assert claims is not None
    assert claims["model_digest"] == DIGEST
    assert usdc.balance_of(seller) == PRICE_ATOMIC


def test_attestation_is_rate_limited_per_address(
    tpm_key: TpmKey, facilitator: Any, seller: str, tmp_path: Path
) -> None:
    with _gateway(tpm_key, facilitator, seller, tmp_path, attestation_rate_per_minute=8) as limited:
        statuses = [
            httpx.get(f"{limited.url}/v1/attestation?nonce={'00' * 32}", timeout=10)
            for _ in range(4)
        ]
    assert [r.status_code for r in statuses[:2]] == [200, 200]  # the burst (a quarter minute)
    assert statuses[-1].status_code == 429
    assert statuses[-1].headers["X-Paygate-Error"] == "rate_limited"
    assert "Retry-After" in statuses[-1].headers
