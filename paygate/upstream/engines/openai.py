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
from pathlib import Path
from typing import Any

from paygate.upstream.engines.base import (
    OPENAI_ROUTES,
    CacheControls,
    ContainerDefaults,
    ContainerLaunch,
    EngineKind,
    LaunchTarget,
    ModelDigest,
    ProfileError,
    ServedRoute,
    gguf_digests,
    openai_model_ids,
)
from paygate.upstream.engines.limits import (
    SINGLE_LIMIT_KEYS,
    ApiShape,
    EngineLimit,
    LimitRefused,
    Post,
    choices_of,
    stated,
)

_LIMITS = ("max_completion_tokens", "max_tokens")


class OpenAIProfile:
    kind: EngineKind = "openai"
    health_path: str = "/v1/models"
    models_path: str = "/v1/models"
    pull_path: str | None = None
    container: ContainerDefaults | None = None

    def routes(self) -> tuple[ServedRoute, ...]:
        return OPENAI_ROUTES

    def model_names(self, listing: Any) -> list[str]:
        return openai_model_ids(listing)

    def digests(self, model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
        return gguf_digests(model_path, model_name)

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        raise ProfileError("upstream_kind openai has no container recipe: use attach mode")

    def api_routes(self) -> tuple[ServedRoute, ...]:
        return ()  # unknown: only the OpenAI surface every engine here serves

    def cache_controls(self) -> CacheControls:
        return CacheControls("none", caller_keys=frozenset({"cache_salt"}))

    # --- generation (see the module docstring) ---

    def limit_keys(self, api: ApiShape) -> tuple[str, ...]:
        return () if api in SINGLE_LIMIT_KEYS else _LIMITS  # no further APIs known

    def known_keys(self, api: ApiShape) -> frozenset[str]:
        return frozenset() if api in SINGLE_LIMIT_KEYS else frozenset({*_LIMITS, "n", "best_of"})

    def limit(self, api: ApiShape, data: Mapping[str, Any]) -> EngineLimit:
        values = [v for v in (stated(data, key) for key in _LIMITS) if v is not None]
        if any(v < 1 for v in values):
            raise LimitRefused("max_tokens and max_completion_tokens must be at least 1")
        return EngineLimit(min(values) if values else None, choices_of(data, "n", "best_of"))

    def dropped_keys(self, api: ApiShape) -> tuple[str, ...]:
        return ()

    def load_options(self, api: ApiShape) -> frozenset[str]:
        return frozenset()

    def ask_running_usage(self, api: ApiShape, data: dict[str, Any]) -> None:
        return None

    async def count_text(self, post: Post, model: str, text: str) -> int | None:
        return None

    async def count_prompt(self, post: Post, path: str, data: Mapping[str, Any]) -> int | None:
        return None
