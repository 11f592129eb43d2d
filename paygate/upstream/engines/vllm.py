"""vLLM's OpenAI server: ``/health`` (an empty 200 once the engine runs), ``/v1/models``.

Container mode runs the ``vllm/vllm-openai`` image with the model directory (or file) mounted
read-only and served under ``--served-model-name``. vLLM cannot run on the test machines, so
this profile is tested against the FAKE model server speaking vLLM's shapes.

Generation (vLLM ``vllm/entrypoints/utils.py`` ``get_max_tokens``,
``vllm/entrypoints/openai/protocol.py``, ``vllm/sampling_params.py``):

- the output limit is ``max_completion_tokens or max_tokens`` (Python ``or``: a 0 or null
  falls through to the other), then the smaller of that and what the context leaves
  (``max_model_len - prompt``); absent, the context's remainder;
- below 1 the request is refused ("max_tokens must be at least 1");
- ``n`` sequences are generated (``best_of``, where taken, generates ``best_of`` ≥ ``n``;
  ``use_beam_search`` has ``n`` beams): the work is the limit times the largest;
- ``min_tokens`` and ``ignore_eos`` stay within the limit;
- ``stream_options.continuous_usage_stats: true`` puts ``usage`` on every streamed chunk;
- ``POST /tokenize`` takes ``{"model", "prompt"}`` or ``{"model", "messages"}`` (chat template
  applied) and answers ``{"count", "tokens", "max_model_len"}``;
- ``priority`` (scheduling), ``kv_transfer_params``, ``vllm_xargs`` and
  ``logits_processors`` reach the scheduler and extensions: load-time options;
- ``/v1/responses`` (``vllm/entrypoints/openai/protocol.py`` ``ResponsesRequest``) is bounded
  by ``max_output_tokens`` alone (absent: the context's remainder), one sequence;
  ``/v1/messages`` (``vllm/entrypoints/anthropic/protocol.py``) by ``max_tokens``, which
  Anthropic's API requires; below 1 either is refused.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from paygate.upstream.engines.base import (
    MESSAGES_ROUTE,
    RESPONSES_ROUTE,
    CacheControls,
    ContainerDefaults,
    EngineKind,
    LaunchTarget,
    ModelDigest,
    ProfileError,
    ServedRoute,
    ServesOneFile,
    file_digest,
)
from paygate.upstream.engines.limits import (
    SINGLE_LIMIT_KEYS,
    ApiShape,
    EngineLimit,
    LimitRefused,
    Post,
    choices_of,
    prompt_text,
    stated,
    token_count,
)

_KNOWN = frozenset(
    {"max_tokens", "max_completion_tokens", "n", "best_of", "use_beam_search", "min_tokens",
     "ignore_eos"}
)  # fmt: skip


class VllmProfile(ServesOneFile):
    kind: EngineKind = "vllm"
    health_path: str = "/health"
    pull_path: str | None = None  # it loads what it is given; downloads happen elsewhere
    container: ContainerDefaults | None = ContainerDefaults(
        image="vllm/vllm-openai", port=8000, models_dir="/models", name="paygate-vllm"
    )
    # Offline: the serving container has no network, so never try the hub.
    environment = MappingProxyType({"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})

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

    def arguments(self, model: str, target: LaunchTarget) -> tuple[str, ...]:
        return ("--model", model, "--served-model-name", target.alias,
                "--host", target.listen, "--port", str(target.port))  # fmt: skip

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

    # --- generation (see the module docstring) ---

    def limit_keys(self, api: ApiShape) -> tuple[str, ...]:
        single = SINGLE_LIMIT_KEYS.get(api)
        if single is not None:
            return (single,)
        return ("max_completion_tokens", "max_tokens") if api == "openai" else ()

    def known_keys(self, api: ApiShape) -> frozenset[str]:
        single = SINGLE_LIMIT_KEYS.get(api)
        if single is not None:
            return frozenset({single})
        return _KNOWN if api == "openai" else frozenset()

    def limit(self, api: ApiShape, data: Mapping[str, Any]) -> EngineLimit:
        single = SINGLE_LIMIT_KEYS.get(api)
        if single is not None:
            # One sequence; Anthropic's max_tokens is required, Responses' optional.
            value = stated(data, single)
            if value is None and api == "messages":
                raise LimitRefused("max_tokens is required")
            if value is not None and value < 1:
                raise LimitRefused(f"{single} must be at least 1")
            return EngineLimit(value)
        value = stated(data, "max_completion_tokens") or stated(data, "max_tokens")
        if value is not None and value < 1:
            raise LimitRefused("max_tokens must be at least 1")
        return EngineLimit(value, choices_of(data, "n", "best_of"))

    def load_options(self, api: ApiShape) -> frozenset[str]:
        return frozenset({"priority", "kv_transfer_params", "vllm_xargs", "logits_processors"})

    def ask_running_usage(self, api: ApiShape, data: dict[str, Any]) -> None:
        options = data.get("stream_options")
        options = dict(options) if isinstance(options, dict) else {}
        options["continuous_usage_stats"] = True
        data["stream_options"] = options

    async def count_text(self, post: Post, model: str, text: str) -> int | None:
        answer = await post(
            "/tokenize", {"model": model, "prompt": text, "add_special_tokens": False}
        )
        return token_count(answer, field="count")

    async def count_prompt(self, post: Post, path: str, data: Mapping[str, Any]) -> int | None:
        model = data.get("model")
        if path.endswith("/chat/completions"):
            body = {"model": model, "messages": data.get("messages")}
        elif (text := prompt_text(data)) is not None:
            body = {"model": model, "prompt": text}
        else:
            return None
        return token_count(await post("/tokenize", body), field="count")
