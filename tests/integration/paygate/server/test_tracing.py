"""OpenTelemetry traces against a local OTLP/HTTP receiver (an aiohttp server in this test that
decodes the protobuf export with the opentelemetry-proto package): a paid, sealed, streamed
request is one trace with the GenAI attributes and no content; its context reaches the model
server; with no endpoint set, nothing is traced or sent."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from paygate_dev.fake_model import reply_words

from paygate.client import AsyncPaygateTransport, SpendPolicy
from paygate.server import tracing
from tests.fixtures.economics_support import gateways
from tests.fixtures.payment_support import paid_settings

PROMPT = "a private prompt about 4711 otters"
SPEND = SpendPolicy(max_per_request="0.01", max_total="1", networks=["base-sepolia"])


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[tuple[str, list[bytes]]]:
    bodies: list[bytes] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        bodies.append(await request.read())
        return web.Response(
            body=b"", content_type="application/x-protobuf"
        )  # an empty ExportTraceServiceResponse

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}", bodies
    finally:
        await runner.cleanup()


def spans_of(bodies: list[bytes]) -> list[dict[str, Any]]:
    found = []
    for body in bodies:
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                for span in scope.spans:
                    attributes = {}
                    for a in span.attributes:
                        value = a.value
                        attributes[a.key] = (
                            value.int_value
                            if value.HasField("int_value")
                            else value.double_value
                            if value.HasField("double_value")
                            else value.string_value
                        )
                    found.append(
                        {
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "attributes": attributes,
                            "service": service.get("service.name"),
                        }
                    )
    return found


async def paid_stream(url: str, payer: Any) -> str:
    transport = AsyncPaygateTransport(wallet=payer, spend=SPEND)
    client = openai.AsyncOpenAI(
        base_url=url + "/v1",
        api_key="unused",
        max_retries=0,
        http_client=httpx.AsyncClient(transport=transport, timeout=30),
    )
    stream = await client.chat.completions.create(
        model="fake-llama:latest",
        messages=[{"role": "user", "content": PROMPT}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    await client.close()
    assert all(p.settled for p in transport.payments)
    return text


async def test_a_paid_sealed_stream_is_one_trace_with_genai_attributes_and_no_content(
    facilitator, usdc, payer, seller, tmp_path, monkeypatch
):
    async with otlp_receiver() as (endpoint, bodies):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "paygate-test")
        settings = paid_settings(
            seller=seller,
            facilitator_url=facilitator.url,
            ledger=f"sqlite:///{tmp_path / 'p.db'}",
            require_encryption=True,
        )
        async with gateways(1, **settings) as [(app, url)]:
            text = await paid_stream(url, payer)
            upstream = _fake_of(app).received[-1].headers
        # Leaving the gateway flushed its spans to the receiver.
    assert text == "".join(" " + w for w in reply_words(PROMPT, len(text.split())))
    spans = spans_of(bodies)
    paid_spans = [s for s in spans if s["attributes"].get("paygate.payment.outcome") == "paid"]
    assert len(paid_spans) == 1, spans
    [span] = paid_spans
    assert len({s["trace_id"] for s in spans}) == len(spans)  # one request, one trace
    assert span["parent"] == ""  # a root: no caller-supplied parent
    assert upstream["traceparent"].split("-")[1] == span["trace_id"]
    assert span["service"] == "paygate-test"
    attributes = span["attributes"]
    assert span["name"] == "chat fake-llama:latest"
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.request.model"] == "fake-llama:latest"
    assert attributes["gen_ai.provider.name"] == "ollama"
    assert attributes["gen_ai.usage.input_tokens"] == len(PROMPT.split())
    assert attributes["gen_ai.usage.output_tokens"] == len(text.split())
    assert attributes["http.route"] == "/v1/chat/completions"
    assert attributes["http.response.status_code"] == 200
    assert attributes["paygate.payment.scheme"] == "exact"
    assert attributes["paygate.upstream.seconds"] > 0
    assert attributes["paygate.settle.seconds"] > 0
    # Never content: neither the prompt nor the reply is anywhere in what was exported.
    exported = b"".join(bodies)
    for word in {*PROMPT.split(), *text.split()} - {"a", "about"}:
        assert word.encode() not in exported, word


async def test_the_model_server_joins_the_trace_and_callers_cannot(monkeypatch):
    async with otlp_receiver() as (endpoint, bodies):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        async with gateways(1) as [(_app, url)]:
            async with httpx.AsyncClient(timeout=15) as client:
                forged = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"
                response = await client.get(url + "/v1/models", headers={"traceparent": forged})
                assert response.status_code == 200
            seen = _fake_of(_app).received[-1].headers
    spans = spans_of(bodies)
    assert len(spans) == 1
    traceparent = seen.get("traceparent", "")
    assert traceparent.split("-")[1] == spans[0]["trace_id"]
    assert "ab" * 16 not in traceparent  # the caller's trace was not continued
    assert spans[0]["parent"] == ""


def _fake_of(app: web.Application) -> Any:
    from tests.fixtures import economics_support

    return economics_support.last_fake


def test_tracing_is_off_without_an_endpoint(monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert tracing.Tracing.from_environment(system="ollama", version="x") is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.Tracing.from_environment(system="ollama", version="x") is None
