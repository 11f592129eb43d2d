"""Counting what a metered reply produced when the model server did not say: the engine's own
tokenizer, asked over the upstream connection (llama-server ``/tokenize`` and
``/apply-template``, vLLM ``/tokenize``; see each engine profile).

Used only for a metered reply that ended without its final usage (the caller went away, the
stream was cut, the engine reported nothing) and carried no running counts either. Every call
is bounded in time and size; any failure is "could not count" (the operator's fallback
applies), never an error for the caller.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from paygate import jsonsafe
from paygate.server.errors import GatewayError
from paygate.server.proxy import Upstream
from paygate.upstream.engines.limits import GenerationRules
from paygate.upstream.usage import Usage

COUNT_TIMEOUT = 5.0  # seconds for all the tokenize calls of one request
MAX_COUNT_REPLY = 8 * 1024 * 1024  # bytes of one tokenize answer (a token list)


@dataclass(frozen=True, slots=True)
class Counted:
    """Tokens counted by the engine's tokenizer; ``prompt`` None when it could not be."""

    prompt: int | None
    completion: int


@dataclass(slots=True)
class Tokenizer:
    """The engine's tokenizer for one request (its route ``path`` and the body forwarded)."""

    upstream: Upstream
    rules: GenerationRules
    path: str
    body: bytes = field(repr=False)

    async def count(self, completion: str) -> Counted | None:
        """The request's prompt and ``completion`` in the engine's tokens, or None when the
        completion cannot be counted."""
        try:
            data = jsonsafe.loads(self.body, max_bytes=max(len(self.body), 1))
        except jsonsafe.UntrustedJSONError:
            return None
        model = data.get("model") if isinstance(data, dict) else None
        if not isinstance(model, str):
            return None
        try:
            async with asyncio.timeout(COUNT_TIMEOUT):
                out = 0
                if completion:
                    out = await self.rules.count_text(self._post, model, completion)
                if out is None:
                    return None
                prompt = await self.rules.count_prompt(self._post, self.path, data)
        except TimeoutError:
            return None
        return Counted(prompt, out)

    async def usage(self, completion: str, prompt_bound: int) -> Usage | None:
        """:meth:`count` as usage (paygate.x402.session's ``CompletionCounter``)."""
        counted = await self.count(completion)
        return usage_from(counted, prompt_bound) if counted is not None else None

    async def _post(self, path: str, payload: dict[str, Any]) -> Any | None:
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        try:
            async with self.upstream.exchange("POST", path, body=body, headers=headers) as reply:
                raw = await reply.read_bounded(MAX_COUNT_REPLY)
                if reply.status >= 400 or raw is None:
                    return None
        except GatewayError:
            return None
        try:
            return jsonsafe.loads(raw, max_bytes=MAX_COUNT_REPLY, max_depth=None)
        except jsonsafe.UntrustedJSONError:
            return None


def usage_from(counted: Counted, prompt_bound: int) -> Usage:
    """Counted tokens as usage; a prompt that could not be counted is its upper bound."""
    prompt = counted.prompt if counted.prompt is not None else prompt_bound
    return Usage(min(prompt, prompt_bound), counted.completion)
