"""Any OpenAI-compatible server (LM Studio, LiteLLM, a hosted API): ``/v1/models`` is its health.

Nothing else is assumed: no container recipe, no pull. A digest is known only when the
operator names the local weights file (``upstream_model_path``).

Generation follows OpenAI's API reference: ``max_completion_tokens`` (and the older
``max_tokens``) bound each choice and must be at least 1; ``n`` choices (``best_of`` on the
legacy completions) are generated. A server that reads only one of the two limit keys obeys
the priced limit anyway: the gateway writes it into every one the request names. No running
usage, no tokenize route.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from paygate.upstream.engines.base import EngineKind, OpenAICompatible
from paygate.upstream.engines.limits import ApiShape, EngineLimit, LimitRefused, choices_of, stated

_LIMITS = ("max_completion_tokens", "max_tokens")


class OpenAIProfile(OpenAICompatible):
    kind: EngineKind = "openai"
    # No further APIs known: Responses and Messages are not served.
    openai_limit_keys = _LIMITS
    openai_known_keys = frozenset({*_LIMITS, "n", "best_of"})

    # --- generation (see the module docstring) ---

    def limit(self, api: ApiShape, data: Mapping[str, Any]) -> EngineLimit:
        values = [v for v in (stated(data, key) for key in _LIMITS) if v is not None]
        if any(v < 1 for v in values):
            raise LimitRefused("max_tokens and max_completion_tokens must be at least 1")
        return EngineLimit(min(values) if values else None, choices_of(data, "n", "best_of"))
