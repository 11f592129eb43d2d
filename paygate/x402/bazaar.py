"""x402's ``bazaar`` discovery extension: what each paid route takes and answers, declared on
every 402 so that a facilitator can list the appliance (and a caller learn how to call it).

The declaration has the shape the official SDK builds (``declare_discovery_extension`` plus
its server extension's method enrichment): ``{"info": {"input": {"type": "http", "method",
"bodyType", "body"} | {"type": "http", "method", "queryParams"?, "pathParams"?}, "output":
{"type": "json", "example"}}, "schema": <JSON Schema 2020-12 of info>}``, with
``routeTemplate`` (``/v1/models/:model``) on a route with a path parameter. x402 v1 carries the
same facts in each requirement's ``outputSchema`` (``input.discoverable``).

The declarations are static per route, built once: a 402 costs no more to answer. The
schemas are kept small on purpose — a paying client echoes the extension inside its
``PAYMENT-SIGNATURE`` header, which must stay under the server's header limit (8 KB).
Sans-IO.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from paygate.x402.models import PaymentRequirementsV1
from paygate.x402.offers import Challenge

BAZAAR = "bazaar"
_SCHEMA_URI = "https://json-schema.org/draft/2020-12/schema"
_BODY_METHODS = ("POST", "PUT", "PATCH")
_PARAM = re.compile(r"\{([a-z_]+)(?::path)?\}")

_STRING = {"type": "string"}
_INT = {"type": "integer", "minimum": 1}
_BOOL = {"type": "boolean"}
_MESSAGES = {
    "type": "array",
    "minItems": 1,
    "items": {
        "type": "object",
        "properties": {"role": _STRING, "content": _STRING},
        "required": ["role", "content"],
    },
}


def _object(required: tuple[str, ...], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required)}


@dataclass(frozen=True, slots=True)
class RouteDoc:
    """What one route takes and answers: a description, an input example and its JSON Schema
    (the body of a POST, the query of a GET), an output example and its schema."""

    description: str
    output_example: Any
    output_schema: Mapping[str, Any]
    input_example: Any = None
    input_schema: Mapping[str, Any] | None = None


_CHAT_IN = _object(
    ("model", "messages"),
    model=_STRING,
    messages=_MESSAGES,
    max_tokens=_INT,
    stream=_BOOL,
    temperature={"type": "number"},
)
_CHAT_EXAMPLE = {"model": "MODEL", "messages": [{"role": "user", "content": "Hello"}]}

#: The inference routes the engines serve (paygate.upstream.engines), by (method, path).
CATALOG: Mapping[tuple[str, str], RouteDoc] = {
    ("POST", "/v1/chat/completions"): RouteDoc(
        "Chat completion (OpenAI API); stream: true answers server-sent events",
        {"object": "chat.completion", "choices": [{"message": {"content": "Hi"}}]},
        _object(("choices",), choices={"type": "array"}, usage={"type": "object"}),
        _CHAT_EXAMPLE,
        _CHAT_IN,
    ),
    ("POST", "/v1/completions"): RouteDoc(
        "Text completion (OpenAI API)",
        {"object": "text_completion", "choices": [{"text": "Hi"}]},
        _object(("choices",), choices={"type": "array"}, usage={"type": "object"}),
        {"model": "MODEL", "prompt": "Hello"},
        _object(("model", "prompt"), model=_STRING, prompt=_STRING, max_tokens=_INT, stream=_BOOL),
    ),
    ("POST", "/v1/embeddings"): RouteDoc(
        "Embeddings (OpenAI API)",
        {"object": "list", "data": [{"embedding": [0.1, 0.2]}]},
        _object(("data",), data={"type": "array"}),
        {"model": "MODEL", "input": "Hello"},
        _object(("model", "input"), model=_STRING, input={"type": ["string", "array"]}),
    ),
    ("GET", "/v1/models"): RouteDoc(
        "The models served (OpenAI API)",
        {"object": "list", "data": [{"id": "MODEL", "object": "model"}]},
        _object(("data",), data={"type": "array"}),
    ),
    ("GET", "/v1/models/{model}"): RouteDoc(
        "One served model (OpenAI API)",
        {"id": "MODEL", "object": "model"},
        _object(("id",), id=_STRING),
    ),
    ("POST", "/v1/batch/chat/completions"): RouteDoc(
        "Several chat completions paid at once: a JSON array of chat requests, answered "
        '{"results": [...]} in order',
        {"results": [{"object": "chat.completion", "choices": []}]},
        _object(("results",), results={"type": "array"}),
        [_CHAT_EXAMPLE],
        {"type": "array", "minItems": 1, "items": _CHAT_IN},
    ),
    ("POST", "/api/chat"): RouteDoc(
        "Chat (Ollama API); streams NDJSON unless stream is false",
        {"message": {"role": "assistant", "content": "Hi"}, "done": True},
        _object(("done",), message={"type": "object"}, done=_BOOL),
        {**_CHAT_EXAMPLE, "stream": False},
        _object(("model", "messages"), model=_STRING, messages=_MESSAGES, stream=_BOOL),
    ),
    ("POST", "/api/generate"): RouteDoc(
        "Text generation (Ollama API); streams NDJSON unless stream is false",
        {"response": "Hi", "done": True},
        _object(("done",), response=_STRING, done=_BOOL),
        {"model": "MODEL", "prompt": "Hello", "stream": False},
        _object(("model",), model=_STRING, prompt=_STRING, stream=_BOOL),
    ),
    ("POST", "/api/embed"): RouteDoc(
        "Embeddings (Ollama API)",
        {"embeddings": [[0.1, 0.2]]},
        _object(("embeddings",), embeddings={"type": "array"}),
        {"model": "MODEL", "input": "Hello"},
        _object(("model", "input"), model=_STRING, input={"type": ["string", "array"]}),
    ),
    ("POST", "/api/embeddings"): RouteDoc(
        "Embedding, legacy (Ollama API)",
        {"embedding": [0.1, 0.2]},
        _object(("embedding",), embedding={"type": "array"}),
        {"model": "MODEL", "prompt": "Hello"},
        _object(("model", "prompt"), model=_STRING, prompt=_STRING),
    ),
    ("POST", "/api/show"): RouteDoc(
        "A model's details (Ollama API)",
        {"details": {"family": "llama"}},
        _object((), details={"type": "object"}),
        {"model": "MODEL"},
        _object(("model",), model=_STRING),
    ),
    ("GET", "/api/tags"): RouteDoc(
        "The models served (Ollama API)",
        {"models": [{"name": "MODEL"}]},
        _object(("models",), models={"type": "array"}),
    ),
    ("GET", "/api/version"): RouteDoc(
        "The model server's version (Ollama API)",
        {"version": "0.0.0"},
        _object(("version",), version=_STRING),
    ),
}


def route_doc(method: str, path: str) -> RouteDoc:
    """The catalog's entry, or a generic one for a route it does not know (a JSON body in,
    JSON out): every paid route is declared, never left out."""
    known = CATALOG.get((method, path))
    if known is not None:
        return known
    if method in _BODY_METHODS:
        return RouteDoc(
            "Inference (JSON request body)", {}, {"type": "object"}, {}, {"type": "object"}
        )
    return RouteDoc("Inference", {}, {"type": "object"})


@dataclass(frozen=True, slots=True)
class Declaration:
    """One route's declarations, built once: the v2 extension and the v1 output schema."""

    description: str
    extension: Mapping[str, Any]
    v1_output_schema: Mapping[str, Any]


def declare(method: str, path: str, *, service: str | None = None) -> Declaration:
    """The ``bazaar`` declaration of ``method path``; ``service`` (the operator's payment
    description) prefixes the route's description."""
    doc = route_doc(method, path)
    names = _PARAM.findall(path)
    body = method in _BODY_METHODS
    info_input: dict[str, Any] = {"type": "http", "method": method}
    input_properties: dict[str, Any] = {
        "type": {"type": "string", "const": "http"},
        "method": {
            "type": "string",
            "enum": list(_BODY_METHODS if body else ("GET", "HEAD", "DELETE")),
        },
    }
    required = ["type", "method"]
    if body:
        info_input |= {"bodyType": "json", "body": doc.input_example or {}}
        input_properties |= {
            "bodyType": {"type": "string", "enum": ["json", "form-data", "text"]},
            "body": dict(doc.input_schema or {"type": "object"}),
        }
        required += ["bodyType", "body"]
    elif doc.input_schema is not None:
        info_input["queryParams"] = doc.input_example or {}
        input_properties["queryParams"] = {"type": "object", **doc.input_schema}
    extension: dict[str, Any] = {}
    if names:
        info_input["pathParams"] = {}  # filled per request (:func:`for_path`)
        input_properties["pathParams"] = _object(tuple(names), **dict.fromkeys(names, _STRING))
        extension["routeTemplate"] = _PARAM.sub(lambda m: ":" + m[1], path)
    extension |= {
        "info": {"input": info_input, "output": {"type": "json", "example": doc.output_example}},
        "schema": {
            "$schema": _SCHEMA_URI,
            "type": "object",
            "properties": {
                "input": {
                    "type": "object",
                    "properties": input_properties,
                    "required": required,
                    "additionalProperties": False,
                },
                "output": _object(("type",), type=_STRING, example=dict(doc.output_schema)),
            },
            "required": ["input"],
        },
    }
    v1_input: dict[str, Any] = {"type": "http", "method": method, "discoverable": True}
    if body:
        v1_input |= {"bodyType": "json", "bodyFields": doc.input_schema or {"type": "object"}}
    description = f"{service}: {doc.description}" if service else doc.description
    return Declaration(
        description=description,
        extension=extension,
        v1_output_schema={"input": v1_input, "output": doc.output_schema},
    )


class Discovery:
    """The declarations of the paid routes, each built once, on its first 402 (the keys are
    the closed route table's templates: a bounded set)."""

    def __init__(self, *, service: str | None = None) -> None:
        self._service = service
        self._declarations: dict[tuple[str, str], Declaration] = {}

    def _declaration(self, method: str, path: str) -> Declaration:
        found = self._declarations.get((method, path))
        if found is None:
            found = self._declarations[(method, path)] = declare(
                method, path, service=self._service
            )
        return found

    def description(self, method: str, path: str) -> str:
        return self._declaration(method, path).description

    def decorate(self, challenge: Challenge, method: str, path: str, url_path: str) -> Challenge:
        """``challenge`` with the route's declaration: the v2 ``bazaar`` extension (path
        parameters read from ``url_path``) and each v1 requirement's ``outputSchema``."""
        found = self._declaration(method, path)
        extension = for_path(found.extension, path, url_path)
        v2 = challenge.v2.model_copy(
            update={"extensions": {**(challenge.v2.extensions or {}), BAZAAR: extension}}
        )
        accepts = [_with_output_schema(r, found.v1_output_schema) for r in challenge.v1.accepts]
        v1 = challenge.v1.model_copy(update={"accepts": accepts})
        return Challenge(v2=v2, v1=v1)


def for_path(extension: Mapping[str, Any], template: str, url_path: str) -> dict[str, Any]:
    """The extension with ``info.input.pathParams`` read from the request's path."""
    if "routeTemplate" not in extension:
        return dict(extension)
    params: dict[str, str] = {}
    segments = url_path.split("/")
    for index, part in enumerate(template.split("/")):
        found = _PARAM.fullmatch(part)
        if found is not None and index < len(segments):
            params[found[1]] = segments[index]
    info = dict(extension["info"])
    info["input"] = {**info["input"], "pathParams": params}
    return {**extension, "info": info}


def _with_output_schema(
    requirement: PaymentRequirementsV1, schema: Mapping[str, Any]
) -> PaymentRequirementsV1:
    return requirement.model_copy(update={"output_schema": dict(schema)})
