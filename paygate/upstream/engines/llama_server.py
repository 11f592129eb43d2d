"""llama.cpp's native ``llama-server``: OpenAI routes, ``/health``, one GGUF file.

``/health`` is 503 while the model loads and 200 once it can answer. The weights' digest is
the served GGUF file's SHA-256 (``upstream_model_path``). In a container the file is
bind-mounted read-only and named with ``--alias``; it gets one compute thread per CPU the
container is granted (``upstream_cpus``).
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


class LlamaServerProfile:
    kind: EngineKind = "llama-server"
    health_path: str = "/health"
    models_path: str = "/v1/models"
    pull_path: str | None = None  # built without libcurl: it serves the file it was given
    container: ContainerDefaults | None = ContainerDefaults(
        image="ghcr.io/ggml-org/llama.cpp:server",  # entrypoint: the llama-server binary
        port=8080,
        models_dir="/models",
        name="paygate-llama-server",
    )

    def routes(self) -> tuple[ServedRoute, ...]:
        return OPENAI_ROUTES

    def model_names(self, listing: Any) -> list[str]:
        return openai_model_ids(listing)

    def digests(self, model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
        return gguf_digests(model_path, model_name)

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        if target.model_path is None:
            raise ProfileError("llama-server in container mode needs upstream_model_path")
        inside = f"{target.models_dir.rstrip('/')}/{target.model_path.name}"
        command = ["-m", inside, "--host", target.listen, "--port", str(target.port)]
        command += ["--alias", target.alias]
        if target.threads is not None:
            # As many compute threads as CPUs granted: more would spin against the HTTP thread.
            command += ["-t", str(target.threads)]
        return ContainerLaunch(
            command=tuple(command), environment={}, model_file=target.model_path,
            model_target=inside,
        )  # fmt: skip

    def api_routes(self) -> tuple[ServedRoute, ...]:
        # The build pinned here (llama.cpp 4227c9b, August 2025) answers 404 to both
        # /v1/responses and /v1/messages: later llama.cpp releases added them.
        return ()

    def cache_controls(self) -> CacheControls:
        # Per request: "id_slot" picks the slot (its KV cache), "cache_prompt" (default true)
        # lets the request reuse the slot's cached prefix; false re-evaluates the whole prompt.
        return CacheControls(
            "slots",
            paths=frozenset({"/v1/chat/completions", "/v1/completions"}),
            caller_keys=frozenset({"cache_salt", "id_slot", "cache_prompt"}),
            slots_path="/props",
        )
