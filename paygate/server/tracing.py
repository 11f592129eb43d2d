"""OpenTelemetry traces: one span per request, in the GenAI semantic conventions.

On only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set
and ``OTEL_SDK_DISABLED`` is not ``true``: spans go to that collector over OTLP/HTTP (protobuf),
batched in the background. Off, nothing is imported and the request path pays one ``is None``.

A span carries the route, the model, the token counts the model server reported, the payment's
outcome and scheme, and the upstream and settlement timings — never a prompt, a reply, a header
value or a payment signature. The span's context is sent to the model server (W3C
``traceparent``); a caller's own ``traceparent`` is not continued (nor forwarded: the header
allowlist drops it), so a caller cannot join, or mark for sampling, the operator's traces.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from paygate.server.logs import answer_noted, facts

ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
#: GenAI ``gen_ai.operation.name`` of our routes (the route table's names).
OPERATIONS = {
    "POST /v1/chat/completions": "chat",
    "POST /v1/batch/chat/completions": "chat",
    "POST /v1/completions": "text_completion",
    "POST /v1/embeddings": "embeddings",
    "POST /api/chat": "chat",
    "POST /api/generate": "text_completion",
    "POST /api/embed": "embeddings",
    "POST /api/embeddings": "embeddings",
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(slots=True)
class SpanFacts:
    """What the gateway learns about a request for its span (set as it goes)."""

    model: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    scheme: str | None = None
    settle_seconds: float | None = None


_FACTS = web.RequestKey("paygate_span_facts", SpanFacts)


def enabled(environ: MutableMapping[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return any(env.get(name) for name in ENDPOINT_VARIABLES)


def span_facts(request: web.Request) -> SpanFacts:
    found = request.get(_FACTS)
    if found is None:
        found = SpanFacts()
        request[_FACTS] = found
    return found


class Tracing:
    """The tracer provider and what the gateway calls; build with :meth:`from_environment`."""

    def __init__(self, provider: Any, *, system: str) -> None:
        from opentelemetry import propagate, trace

        self._provider = provider
        self._tracer = provider.get_tracer("paygate")
        self._propagate = propagate
        self._trace = trace
        self._system = system

    @classmethod
    def from_environment(cls, *, system: str, version: str) -> Tracing | None:
        """The exporter the standard ``OTEL_*`` variables describe, or None (tracing off)."""
        if not enabled():
            return None
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = {"service.version": version}
        if not os.environ.get("OTEL_SERVICE_NAME"):  # the operator's name wins
            attributes["service.name"] = "paygate"
        provider = TracerProvider(resource=Resource.create(attributes))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        return cls(provider, system=system)

    def wrap(self, handler: Handler) -> Handler:
        """The request's span around ``handler`` (current while it runs: the upstream call is
        made inside it and carries its context)."""
        tracer = self._tracer
        kind = self._trace.SpanKind.SERVER

        async def traced(request: web.Request) -> web.StreamResponse:
            # No parent from the caller: a fresh root per request.
            with tracer.start_as_current_span(
                "request",
                kind=kind,
                context=self._trace.set_span_in_context(self._trace.INVALID_SPAN),
                record_exception=False,
                set_status_on_exception=False,
            ) as span:
                try:
                    return await answer_noted(handler, request, facts(request))
                finally:
                    self._describe(span, request)

        return traced

    def _describe(self, span: Any, request: web.Request) -> None:
        info = facts(request)
        more = request.get(_FACTS) or SpanFacts()
        operation = OPERATIONS.get(info.route, "other")
        sent = info.status
        span.update_name(f"{operation} {more.model}" if more.model else operation)
        attributes: dict[str, Any] = {
            "http.request.method": request.method,
            "http.route": info.route.partition(" ")[2] or info.route,
            "http.response.status_code": sent or 499,
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": self._system,
            "paygate.payment.outcome": info.payment,
        }
        if more.model:
            attributes["gen_ai.request.model"] = more.model
        if more.input_tokens is not None:
            attributes["gen_ai.usage.input_tokens"] = more.input_tokens
        if more.output_tokens is not None:
            attributes["gen_ai.usage.output_tokens"] = more.output_tokens
        if more.scheme:
            attributes["paygate.payment.scheme"] = more.scheme
        if info.upstream_seconds is not None:
            attributes["paygate.upstream.seconds"] = round(info.upstream_seconds, 6)
        if more.settle_seconds is not None:
            attributes["paygate.settle.seconds"] = round(more.settle_seconds, 6)
        span.set_attributes(attributes)
        if sent >= 500 or not sent:
            span.set_status(self._trace.StatusCode.ERROR)

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """The current span's ``traceparent`` into the upstream request's headers."""
        self._propagate.inject(headers)

    def shutdown(self) -> None:
        """Send what is batched (bounded by the SDK's export timeout) and stop."""
        self._provider.shutdown()
