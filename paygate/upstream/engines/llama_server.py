"""llama.cpp's native ``llama-server``: OpenAI routes, ``/health``, one GGUF file.

``/health`` is 503 while the model loads and 200 once it can answer. The weights' digest is
the served GGUF file's SHA-256 (``upstream_model_path``). In a container the file is
bind-mounted read-only and named with ``--alias``; it gets one compute thread per CPU the
container is granted (``upstream_cpus``).

Generation (llama.cpp ``tools/server/server.cpp``, ``params_from_json_cmpl``, and
``utils.hpp``, ``oaicompat_*_params_parse``; checked against the server built from
llama.cpp 4227c9b that the tests run):

- the output limit is ``n_predict``, else ``max_tokens``
  (``json_value(data, "n_predict", json_value(data, "max_tokens", …))``); a null or a value
  of another type counts as absent. ``max_completion_tokens`` is not read: alone it leaves the
  request unbounded (it ran to the 4096-token context in our test);
- ``-1`` means no limit; ``0`` and other negatives still produce one token (the budget is
  checked after each token);
- ``n`` other than 1 is refused ("Only one completion choice is allowed"), and so is
  ``best_of`` on completions ("Unsupported param: best_of");
- ``timings_per_token: true`` puts ``timings.prompt_n`` / ``timings.predicted_n`` on every
  streamed chunk (running counts; ``prompt_n`` leaves out a cached prefix);
- ``POST /tokenize {"content", "add_special"}`` answers ``{"tokens": [...]}`` and
  ``POST /apply-template {"messages"}`` the chat-templated prompt: the engine's own counts;
- ``id_slot`` (pin a slot, its cache) and ``lora`` (per-request adapters) steer the server's
  shared state: load-time options.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from paygate.upstream.engines.base import (
    CacheControls,
    ContainerDefaults,
    EngineKind,
    LaunchTarget,
    ServedRoute,
    ServesOneFile,
)
from paygate.upstream.engines.limits import (
    ApiShape,
    EngineLimit,
    LimitRefused,
    Post,
    prompt_text,
    stated,
    token_count,
)

_KNOWN = frozenset(
    {"max_tokens", "max_completion_tokens", "n_predict", "n", "best_of", "ignore_eos"}
)


class LlamaServerProfile(ServesOneFile):
    kind: EngineKind = "llama-server"
    health_path: str = "/health"
    pull_path: str | None = None  # built without libcurl: it serves the file it was given
    container: ContainerDefaults | None = ContainerDefaults(
        image="ghcr.io/ggml-org/llama.cpp:server",  # entrypoint: the llama-server binary
        port=8080,
        models_dir="/models",
        name="paygate-llama-server",
    )
    openai_limit_keys = ("n_predict", "max_tokens")
    openai_known_keys = _KNOWN

    def arguments(self, model: str, target: LaunchTarget) -> tuple[str, ...]:
        command = ("-m", model, "--host", target.listen, "--port", str(target.port),
                   "--alias", target.alias)  # fmt: skip
        if target.threads is None:
            return command
        # As many compute threads as CPUs granted: more would spin against the HTTP thread.
        return (*command, "-t", str(target.threads))

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

    # --- generation (see the module docstring) ---

    def limit(self, api: ApiShape, data: Mapping[str, Any]) -> EngineLimit:
        n = stated(data, "n")
        if n is not None and n != 1:
            raise LimitRefused("llama-server generates one choice: n must be 1")
        best_of = stated(data, "best_of")
        if best_of is not None and best_of != 1:
            raise LimitRefused("llama-server does not take best_of")
        value = stated(data, "n_predict")
        if value is None:
            value = stated(data, "max_tokens")
        if value is None or value == -1:
            return EngineLimit(None)
        return EngineLimit(max(value, 1))

    def load_options(self, api: ApiShape) -> frozenset[str]:
        return frozenset({"id_slot", "lora"})

    def ask_running_usage(self, api: ApiShape, data: dict[str, Any]) -> None:
        data["timings_per_token"] = True

    async def count_text(self, post: Post, model: str, text: str) -> int | None:
        answer = await post("/tokenize", {"content": text, "add_special": False})
        return token_count(answer, field="tokens")

    async def count_prompt(self, post: Post, path: str, data: Mapping[str, Any]) -> int | None:
        text = prompt_text(data)
        if path.endswith("/chat/completions"):
            rendered = await post("/apply-template", {"messages": data.get("messages")})
            text = rendered.get("prompt") if isinstance(rendered, dict) else None
        if not isinstance(text, str):
            return None
        answer = await post("/tokenize", {"content": text, "add_special": True})
        return token_count(answer, field="tokens")
