"""The body a model server gets, sans-IO: one function for every path (free, exact, upto, batch
items, payments off) so that no request buys more model work than its price covers.

For a generation route, :meth:`RequestShaper.shape`:

1. refuses load-time engine options (Ollama ``keep_alive`` and runner options, llama-server
   slots and LoRA, vLLM priority …) the operator did not allow — ``engine_option_refused``;
2. refuses generation-length keys the engine's rules say nothing about —
   ``unsupported_limit_key`` (never forwarded: an unknown knob cannot be priced);
3. computes the limit the engine would obey for the body as sent (its keys, precedence, the
   meaning of 0, negatives and absence, ``n``/``best_of``; a request the engine would refuse
   is refused here — ``invalid_output_limit``), bounds it by the operator's cap, and writes
   that one limit into every limit key the engine reads and every one the request named.

The Responses API (``max_output_tokens``) and Anthropic's Messages API (``max_tokens``,
required) are shaped by the same steps on the engines that serve them (vLLM); a model whose
engine does not serve the route's API is refused (``model_not_found``) before any price. With
several model servers the rules are those of the engine serving the body's ``model``.

What comes out is what the gateway prices: ``tokens`` per sequence times ``choices``. Other
routes (embeddings, ``/api/show``) get the options check only, and so does every route when
payments are off (nothing is sold: the body is forwarded as the caller sent it).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from paygate import jsonsafe
from paygate.upstream.engines.limits import (
    LENGTH_KEYS,
    ApiShape,
    GenerationRules,
    present,
)
from paygate.upstream.errors import ApiNotServed, LengthKeyRefused, OptionRefused

# Route paths whose replies are generated tokens: output-bounded, metered.
GENERATION_PATHS: Mapping[str, ApiShape] = {
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/api/chat": "ollama",
    "/api/generate": "ollama",
    # Where the engine serves them (its profile's api_routes()); limit keys of their own.
    "/v1/responses": "responses",
    "/v1/messages": "messages",
}
# The limit keys the gateway writes (where a request names them): every spelling it knows.
_LIMIT_SPELLINGS = (
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n_predict",
    "options.num_predict",
)


@dataclass(frozen=True, slots=True)
class Shaped:
    """A generation request as forwarded: at most ``tokens`` per sequence, ``choices``
    sequences; ``data`` is the body (parsed) with the limit written in."""

    api: ApiShape
    model: str | None
    tokens: int
    choices: int
    data: dict[str, Any] = field(repr=False)

    @property
    def max_output(self) -> int:
        """The most output tokens the request can produce: what is priced."""
        return self.tokens * self.choices

    def body(self) -> bytes:
        return json.dumps(self.data, separators=(",", ":")).encode()


def api_of(path: str) -> ApiShape:
    return "ollama" if path.startswith("/api/") else "openai"


class RequestShaper:
    """One per gateway: the engines' rules, the output cap, the options the operator allows.

    ``rules`` are the engine's; with several model servers of different engines, ``by_model``
    names the rules of the engine serving each model (``rules`` the rest)."""

    def __init__(
        self,
        rules: GenerationRules,
        *,
        cap: int,
        by_model: Mapping[str, GenerationRules] | None = None,
        allowed_options: frozenset[str] = frozenset(),
        running_usage: bool = True,
        limits: bool = True,
    ) -> None:
        self._rules = rules
        self._by_model = dict(by_model or {})
        # False (payments off: nothing is sold): options are checked, bodies pass unchanged.
        self._limits = limits
        self._cap = cap
        self._allowed = allowed_options
        self._running_usage = running_usage

    @property
    def rules(self) -> GenerationRules:
        return self._rules

    def rules_for(self, model: str | None) -> GenerationRules:
        """The rules of the engine that serves ``model``."""
        if model is None:
            return self._rules
        return self._by_model.get(model, self._rules)

    @property
    def cap(self) -> int:
        return self._cap

    def shape(self, path: str, body: bytes) -> Shaped | None:
        """The shaped request of a generation route (None for other routes, or a body that is
        not a JSON object: the engine answers those itself). Raises UntrustedJSONError (the
        caller's 400) on a generation route's unparsable body, and the refusals above."""
        api = GENERATION_PATHS.get(path)
        if api is None or not body or not self._limits:
            return None
        data = jsonsafe.loads(body, max_bytes=len(body))
        if not isinstance(data, dict):
            return None
        return self.shape_data(path, data)

    def shape_data(self, path: str, data: dict[str, Any]) -> Shaped:
        api = GENERATION_PATHS.get(path, api_of(path))
        model = data.get("model")
        model = model if isinstance(model, str) and 0 < len(model) <= 256 else None
        rules = self.rules_for(model)
        self._check_options(rules, api, data)
        reads = rules.limit_keys(api)
        if not reads:
            raise ApiNotServed(f"no model server here serves {path} for this model")
        known = rules.known_keys(api)
        for key in sorted(LENGTH_KEYS):
            if key not in known and present(data, key):
                raise LengthKeyRefused(f"{key} is not a limit this gateway prices on this engine")
        limit = rules.limit(api, data)
        tokens = self._cap if limit.tokens is None else min(limit.tokens, self._cap)
        for key in rules.dropped_keys(api):
            data.pop(key, None)
        targets = [k for k in (*reads, *_LIMIT_SPELLINGS) if k in known and present(data, k)]
        if not any(k in reads for k in targets):
            targets.append(reads[0])
        for key in dict.fromkeys(targets):
            _put(data, key, tokens)
        return Shaped(
            api=api,
            model=model,
            tokens=tokens,
            choices=limit.choices,
            data=data,
        )

    def check_options(self, path: str, body: bytes) -> None:
        """The options check alone, for a route that generates nothing (embeddings …)."""
        if not body:
            return
        try:
            data = jsonsafe.loads(body, max_bytes=len(body))
        except jsonsafe.UntrustedJSONError:
            return  # not JSON: the engine answers it; it carries no option either way
        if isinstance(data, dict):
            model = data.get("model")
            rules = self.rules_for(model if isinstance(model, str) else None)
            self._check_options(rules, api_of(path), data)

    def ask_usage(self, shaped: Shaped) -> bool:
        """A metered OpenAI stream: ask for usage (final, and running where the engine can)
        in ``shaped.data``; True when the caller did not ask for it (the gateway strips it).
        Ollama's native routes report their counts on the final object unasked, and the
        Responses and Messages APIs on their own final events."""
        data = shaped.data
        if shaped.api != "openai" or data.get("stream") is not True:
            return False
        options = data.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        strip = options.get("include_usage") is not True
        options["include_usage"] = True
        data["stream_options"] = options
        if self._running_usage:
            self.rules_for(shaped.model).ask_running_usage(shaped.api, data)
        return strip

    def _check_options(
        self, rules: GenerationRules, api: ApiShape, data: Mapping[str, Any]
    ) -> None:
        for key in sorted(rules.load_options(api) - self._allowed):
            if present(data, key):
                raise OptionRefused(f"{key} is the operator's to set on this gateway")


def _put(data: dict[str, Any], key: str, value: int) -> None:
    head, _, rest = key.partition(".")
    if not rest:
        data[head] = value
        return
    inner = data.get(head)
    inner = dict(inner) if isinstance(inner, dict) else {}
    _put(inner, rest, value)
    data[head] = inner
