"""Any OpenAI-compatible server (LM Studio, LiteLLM, a hosted API): ``/v1/models`` is its health.

Nothing else is assumed: no container recipe, no pull. A digest is known only when the
operator names the local weights file (``upstream_model_path``).
"""

from __future__ import annotations

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
