"""What bounds the output of one generation request on an engine, sans-IO.

Every engine reads its own keys for the output limit, in its own precedence, and gives 0,
negatives and absence its own meaning; some generate ``n`` (or ``best_of``) sequences per
request. Each profile states those facts (:meth:`GenerationRules.limit`) with the engine
source they come from; :mod:`paygate.upstream.shaping` turns them into the one limit the
gateway prices and writes into every key the engine reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from paygate.errors import PaygateError

# The wire format of a generation route: OpenAI's chat/completions, Ollama's native API,
# OpenAI's Responses API, Anthropic's Messages API (the last two where an engine serves them).
# A ServedRoute's errors are shaped as OpenAI's or Ollama's (Responses, Messages: "openai").
ApiShape = Literal["openai", "ollama", "responses", "messages"]
# The one key that bounds the output of the Responses and Messages APIs.
SINGLE_LIMIT_KEYS: Mapping[str, str] = {"responses": "max_output_tokens", "messages": "max_tokens"}

# Keys that set or change how much a request generates, across the engines and APIs paygate
# knows. A key here that the route's engine does not state a meaning for is refused (400):
# the gateway never forwards a length knob it cannot price.
LENGTH_KEYS: frozenset[str] = frozenset(
    {
        "max_tokens",
        "max_completion_tokens",
        "max_new_tokens",
        "max_output_tokens",
        "max_length",
        "max_tokens_to_sample",
        "min_tokens",
        "min_new_tokens",
        "n_predict",
        "num_predict",
        "options.num_predict",
        "n",
        "best_of",
        "num_return_sequences",
        "use_beam_search",
        "ignore_eos",
    }
)
MAX_CHOICES = 16  # the most sequences one request may ask an engine to generate


class LimitRefused(PaygateError):
    """The request's output limit cannot be made one the gateway prices (a stable 400)."""

    message = "the request's output limit cannot be made one the gateway prices"

    code = "invalid_output_limit"


@dataclass(frozen=True, slots=True)
class EngineLimit:
    """What the engine would generate for a request as sent: ``tokens`` per sequence (None: no
    limit of the request's own, the engine runs to its context) times ``choices`` sequences."""

    tokens: int | None
    choices: int = 1


# ``post(path, json)`` → the parsed JSON answer, or None (unreachable, an error, not JSON).
Post = Callable[[str, dict[str, Any]], Awaitable[Any | None]]


class GenerationRules(Protocol):
    """One engine's facts about generation requests (each profile implements them)."""

    def limit_keys(self, api: ApiShape) -> tuple[str, ...]:
        """The keys (dotted: ``options.num_predict``) the engine reads for the output limit;
        the gateway writes the priced limit into every one of them. Empty: the engine does
        not serve that API (the gateway refuses the request before pricing it)."""
        ...

    def known_keys(self, api: ApiShape) -> frozenset[str]:
        """The :data:`LENGTH_KEYS` this engine's rules cover (read, or known to be ignored)."""
        ...

    def limit(self, api: ApiShape, data: Mapping[str, Any]) -> EngineLimit:
        """What the engine would generate for ``data`` as sent; LimitRefused when the engine
        would refuse it (the gateway answers first, the same way every time)."""
        ...

    def dropped_keys(self, api: ApiShape) -> tuple[str, ...]:
        """Keys the engine ignores that would multiply work elsewhere: removed before
        forwarding, so the forwarded body states only what is generated and priced."""
        ...

    def load_options(self, api: ApiShape) -> frozenset[str]:
        """Request keys (dotted) that change how the engine loads or schedules models for
        everyone (context size, GPU layers, keep-alive, slots, LoRA, priority …)."""
        ...

    def ask_running_usage(self, api: ApiShape, data: dict[str, Any]) -> None:
        """Ask (in ``data``, a stream) for usage on every chunk, where the engine can."""
        ...

    async def count_text(self, post: Post, model: str, text: str) -> int | None:
        """``text``'s tokens by the engine's own tokenizer, or None (it has none to ask)."""
        ...

    async def count_prompt(self, post: Post, path: str, data: Mapping[str, Any]) -> int | None:
        """The request's prompt tokens by the engine's own tokenizer (chat template
        applied), or None."""
        ...


def integer(value: Any) -> int | None:
    """A JSON integer (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def lookup(data: Mapping[str, Any], key: str) -> Any:
    """The value at a dotted key, or None."""
    head, _, rest = key.partition(".")
    value = data.get(head)
    if not rest:
        return value
    return lookup(value, rest) if isinstance(value, Mapping) else None


def present(data: Mapping[str, Any], key: str) -> bool:
    head, _, rest = key.partition(".")
    if head not in data:
        return False
    if not rest:
        return True
    inner = data[head]
    return isinstance(inner, Mapping) and present(inner, rest)


def stated(data: Mapping[str, Any], key: str) -> int | None:
    """A limit key's integer value; LimitRefused when it is there but not an integer."""
    if not present(data, key):
        return None
    value = lookup(data, key)
    number = integer(value)
    if number is None and value is not None:
        raise LimitRefused(f"{key} must be an integer")
    return number


def choices_of(data: Mapping[str, Any], *keys: str) -> int:
    """The sequences ``keys`` (``n``, ``best_of``) ask for: the largest, at least 1."""
    most = 1
    for key in keys:
        value = stated(data, key)
        if value is None:
            continue
        if not 1 <= value <= MAX_CHOICES:
            raise LimitRefused(f"{key} must be between 1 and {MAX_CHOICES}")
        most = max(most, value)
    return most


def token_count(answer: Any, *, field: str) -> int | None:
    """A tokenize answer's count: ``answer[field]`` as an int, or its length as a list."""
    if not isinstance(answer, dict):
        return None
    value = answer.get(field)
    if isinstance(value, list):
        return len(value)
    return integer(value) if integer(value) is not None and value >= 0 else None


def prompt_text(data: Mapping[str, Any]) -> str | None:
    """A completion request's prompt as one string (None: not a single text prompt)."""
    prompt = data.get("prompt")
    return prompt if isinstance(prompt, str) else None
