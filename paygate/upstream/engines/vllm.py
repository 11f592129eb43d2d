"""vLLM's OpenAI server: ``/health`` (an empty 200 once the engine runs), ``/v1/models``.

Container mode runs the ``vllm/vllm-openai`` image with the model directory (or file) mounted
read-only and served under ``--served-model-name``. vLLM cannot run on the test machines, so
this profile is tested against the FAKE model server speaking vLLM's shapes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from paygate.upstream.engines.base import (
    MESSAGES_ROUTE,
    OPENAI_ROUTES,
    RESPONSES_ROUTE,
    CacheControls,
    ContainerDefaults,
    ContainerLaunch,
    EngineKind,
    LaunchTarget,
    ModelDigest,
    ProfileError,
    ServedRoute,
    file_digest,
    openai_model_ids,
)


class VllmProfile:
    kind: EngineKind = "vllm"
    health_path: str = "/health"
    models_path: str = "/v1/models"
    pull_path: str | None = None  # it loads what it is given; downloads happen elsewhere
    container: ContainerDefaults | None = ContainerDefaults(
        image="vllm/vllm-openai", port=8000, models_dir="/models", name="paygate-vllm"
    )

    def routes(self) -> tuple[ServedRoute, ...]:
        return OPENAI_ROUTES

    def model_names(self, listing: Any) -> list[str]:
        return openai_model_ids(listing)

    def digests(self, model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
        # A file (GGUF) hashes as itself; a Hugging Face directory as its weight files in
        # name order, each one's digest over the list (so a renamed shard changes it).
        if model_path is None:
            return []
        name = model_name or model_path.name
        if model_path.is_file():
            return [ModelDigest(name, file_digest(model_path))]
        shards = sorted(
            p for p in model_path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")
        )
        if not shards:
            raise ProfileError(f"no weight files (.safetensors, .bin, .gguf) in {model_path}")
        lines = "".join(f"{file_digest(p)}  {p.name}\n" for p in shards)
        return [ModelDigest(name, "sha256:" + hashlib.sha256(lines.encode()).hexdigest())]

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        if target.model_path is None:
            raise ProfileError("vllm in container mode needs upstream_model_path")
        inside = f"{target.models_dir.rstrip('/')}/{target.model_path.name}"
        command = ("--model", inside, "--served-model-name", target.alias,
                   "--host", target.listen, "--port", str(target.port))  # fmt: skip
        # Offline: the serving container has no network, so never try the hub.
        environment = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
        return ContainerLaunch(command, environment, target.model_path, inside)

    def api_routes(self) -> tuple[ServedRoute, ...]:
        return (RESPONSES_ROUTE, MESSAGES_ROUTE)

    def cache_controls(self) -> CacheControls:
        # "cache_salt" (vLLM 0.9+) salts the prefix-cache block hashes of chat, completions and
        # responses. vLLM's Anthropic endpoint takes no salt (its request model drops unknown
        # fields): /v1/messages shares one unsalted cache among its callers (documented).
        return CacheControls(
            "salt",
            paths=frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"}),
            caller_keys=frozenset({"cache_salt"}),
        )
