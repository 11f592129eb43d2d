"""What paygate knows about one model server engine: the protocol every profile implements.

A profile is pure data plus pure functions: the routes the engine serves, how to ask whether it
is ready and which models it lists, where token usage appears in its replies, how to compute
the digest of the weights it serves, and how to run it in a container (image, arguments,
environment, the model mount, the port). Attach mode, discovery, container mode and
``paygate upstream pull`` read the profile; none of them knows an engine by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

from paygate.upstream.engines.limits import SINGLE_LIMIT_KEYS, ApiShape, GenerationRules, Post
from paygate.upstream.errors import UpstreamError

EngineKind = Literal["ollama", "llama-server", "vllm", "openai"]
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class ServedRoute:
    """One inference route the engine serves (the gateway prices and forwards it)."""

    method: str
    path: str
    api: ApiShape


def route_table(
    api: ApiShape, *, post: tuple[str, ...] = (), get: tuple[str, ...] = ()
) -> tuple[ServedRoute, ...]:
    """One API's routes: its POST paths, then its GET paths."""
    posts = tuple(ServedRoute("POST", path, api) for path in post)
    return posts + tuple(ServedRoute("GET", path, api) for path in get)


# The OpenAI-compatible surface every engine here serves.
OPENAI_ROUTES = route_table(
    "openai",
    post=("/v1/chat/completions", "/v1/completions", "/v1/embeddings"),
    get=("/v1/models", "/v1/models/{model}"),
)


# The Responses API and Anthropic's Messages API, where an engine serves them (its
# ``api_routes()``): sealed, paid and metered like chat; usage read from their own objects.
RESPONSES_ROUTE = ServedRoute("POST", "/v1/responses", "openai")
MESSAGES_ROUTE = ServedRoute("POST", "/v1/messages", "openai")

CacheIsolationKind = Literal["salt", "slots", "none"]


@dataclass(frozen=True, slots=True)
class CacheControls:
    """What an engine offers to keep one caller's prompt cache from another's (the gateway sets
    it per payer; docs/UPSTREAM.md "Cache isolation").

    - ``salt``: a per-request field (vLLM ``cache_salt``) mixed into the prefix-cache keys;
    - ``slots``: llama-server's per-request ``id_slot`` and ``cache_prompt``: the gateway leases
      a slot per request and lets a request reuse the slot's cache only when that slot last
      served the same payer (``slots_path`` says how many slots there are);
    - ``none``: nothing per request (documented; the engine's cache is shared).

    ``paths`` are the routes the parameter applies to; ``caller_keys`` are the request fields
    a caller may not set itself (refused with a 400: they would pick another cache domain).
    """

    kind: CacheIsolationKind
    paths: frozenset[str] = frozenset()
    caller_keys: frozenset[str] = frozenset()
    salt_key: str = "cache_salt"
    slots_path: str | None = None


NO_CACHE_CONTROLS = CacheControls("none")


@dataclass(frozen=True, slots=True)
class ModelDigest:
    """A served model and the digest of its weights (``sha256:<hex>``)."""

    name: str
    digest: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "digest": self.digest}


@dataclass(frozen=True, slots=True)
class ContainerDefaults:
    """Per-engine defaults for container mode (each one a setting that overrides it)."""

    image: str
    port: int
    models_dir: str
    name: str


@dataclass(frozen=True, slots=True)
class ContainerLaunch:
    """How the serving container runs the engine.

    ``command`` is passed as the container's arguments (the image's entrypoint is the engine);
    ``model_file`` is the host file bind-mounted read-only at ``model_target``, or None when the
    engine keeps its models in the deployment's volume (Ollama).
    """

    command: tuple[str, ...]
    environment: Mapping[str, str]
    model_file: Path | None = None
    model_target: str | None = None


@dataclass(frozen=True, slots=True)
class LaunchTarget:
    """What the settings say about the serving container (resolved per-engine defaults)."""

    listen: str
    port: int
    models_dir: str
    model_path: Path | None
    alias: str
    threads: int | None  # compute threads, from upstream_cpus (None: the engine decides)


class ProfileError(UpstreamError):
    """A profile cannot do what the settings ask (a missing model path, say)."""

    message = "the engine profile cannot do what the settings ask"

    code = "engine_profile"


class EngineProfile(GenerationRules, Protocol):
    """One engine. Implementations: ollama, llama_server, vllm, openai (this package).

    Its :class:`~paygate.upstream.engines.limits.GenerationRules` state how the engine bounds
    a generation request's output, which options it loads models with, and how to ask it for
    running usage and token counts (each with the engine source it comes from).

    Where usage appears follows the route's ``api``: OpenAI routes carry ``usage`` (in a
    stream, the last chunk before ``[DONE]`` when the caller set
    ``stream_options.include_usage``), Ollama-native routes ``prompt_eval_count`` and
    ``eval_count`` in the final (``done``) object; :mod:`paygate.upstream.usage` reads both.
    """

    kind: EngineKind
    health_path: str  # readiness: 2xx means ready to answer inference requests
    models_path: str  # the model list
    pull_path: str | None  # the engine's own model download route, if it has one
    container: ContainerDefaults | None  # None: no container recipe (attach only)

    def routes(self) -> tuple[ServedRoute, ...]:
        """The inference routes this engine serves (anything else is 404 at the gateway)."""
        ...

    def model_names(self, listing: Any) -> list[str]:
        """The model names in a parsed ``models_path`` reply ([] if it is not one)."""
        ...

    def digests(self, model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
        """The served weights' digests, computed from local files (blocking: use a thread)."""
        ...

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        """The serving container's arguments and environment."""
        ...

    def api_routes(self) -> tuple[ServedRoute, ...]:
        """Further APIs the engine serves (``/v1/responses``, ``/v1/messages``), if any."""
        ...

    def cache_controls(self) -> CacheControls:
        """How the engine's prompt cache can be isolated per caller (see CacheControls)."""
        ...


def file_digest(path: Path) -> str:
    """``sha256:<hex>`` of a file, read in 1 MiB pieces (a model file is gigabytes)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as fh:
            while chunk := fh.read(_HASH_CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise ProfileError(f"cannot read the model file {path}: {exc.strerror}") from None
    return "sha256:" + digest.hexdigest()


def listed_names(listing: Any, key: str, name: str) -> list[str]:
    """The string ``name`` of each object in a parsed model list's ``key`` list: OpenAI's
    ``{"data": [{"id": ...}]}`` is ``("data", "id")`` ([] if it is not such a list)."""
    items = listing.get(key) if isinstance(listing, dict) else None
    if not isinstance(items, list):
        return []
    return [
        item[name] for item in items if isinstance(item, dict) and isinstance(item.get(name), str)
    ]


def gguf_digests(model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
    """One GGUF file's digest, named ``model_name`` or the file's name (no path: no weights)."""
    if model_path is None:
        return []
    return [ModelDigest(model_name or model_path.name, file_digest(model_path))]


class OpenAICompatible:
    """What a profile does where it says nothing else: an OpenAI-compatible server. The OpenAI
    routes and model list, one GGUF file's digest, no container recipe, no further APIs, no
    per-caller cache; on OpenAI routes the output limit keys ``openai_limit_keys`` (nothing
    known on Responses or Messages), nothing dropped, no load-time options, no running usage,
    no tokenize route. Each profile states its own ``kind`` and ``limit``."""

    kind: EngineKind
    health_path: str = "/v1/models"
    models_path: str = "/v1/models"
    pull_path: str | None = None
    container: ContainerDefaults | None = None
    #: On OpenAI routes: the keys that bound the output, and every generation key it knows.
    openai_limit_keys: tuple[str, ...] = ()
    openai_known_keys: frozenset[str] = frozenset()

    def routes(self) -> tuple[ServedRoute, ...]:
        return OPENAI_ROUTES

    def model_names(self, listing: Any) -> list[str]:
        return listed_names(listing, "data", "id")

    def digests(self, model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
        return gguf_digests(model_path, model_name)

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        raise ProfileError(f"upstream_kind {self.kind} has no container recipe: use attach mode")

    def api_routes(self) -> tuple[ServedRoute, ...]:
        return ()

    def cache_controls(self) -> CacheControls:
        return CacheControls("none", caller_keys=frozenset({"cache_salt"}))

    def limit_keys(self, api: ApiShape) -> tuple[str, ...]:
        return () if api in SINGLE_LIMIT_KEYS else self.openai_limit_keys

    def known_keys(self, api: ApiShape) -> frozenset[str]:
        return frozenset() if api in SINGLE_LIMIT_KEYS else self.openai_known_keys

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


class ServesOneFile(OpenAICompatible):
    """An engine whose container serves the one weights file (or directory) of
    ``upstream_model_path``, bind-mounted read-only under its models directory; each states
    its ``arguments`` and ``environment``."""

    environment: Mapping[str, str] = MappingProxyType({})

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        if target.model_path is None:
            raise ProfileError(f"{self.kind} in container mode needs upstream_model_path")
        inside = f"{target.models_dir.rstrip('/')}/{target.model_path.name}"
        command = self.arguments(inside, target)
        return ContainerLaunch(command, dict(self.environment), target.model_path, inside)

    def arguments(self, model: str, target: LaunchTarget) -> tuple[str, ...]:
        """The engine's arguments to serve ``model`` (the weights' path in the container)."""
        raise NotImplementedError
