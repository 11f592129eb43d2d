"""Ollama: its native ``/api/*`` routes as well as the OpenAI ones, ``/api/version`` as health.

The weights' digest is that of the manifest layer whose mediaType is
``application/vnd.ollama.image.model`` (the GGUF blob), read from the manifests under the
models directory and checked against the blob itself: the blob Ollama will load
(``blobs/sha256-<hex>``) is hashed at start and must have the digest its manifest names, so
the attested digest is that of the bytes served, not a claim in a text file. ``/api/tags``
shows the *manifest's* digest, which also changes with the template or parameters, so it is
not the weights'. Ollama keeps its models in the deployment's
volume and is the one engine ``paygate upstream pull`` can ask to download (``/api/pull``).

Generation (Ollama ``openai/openai.go``, ``api/types.go``, the runners'
``numPredict > 0 && numPredicted >= numPredict`` stop, ``llm`` bounding of ``num_predict``):

- native routes: the output limit is ``options.num_predict`` (a model's Modelfile default
  when absent, ``-1`` unless set); 0 and negatives mean *no limit* (Ollama then bounds the
  request by a multiple of the context only);
- OpenAI routes: ``max_tokens`` becomes ``num_predict``; ``max_completion_tokens`` is not
  read, nor are ``n`` and ``best_of`` (one choice);
- usage comes only on the final object (``prompt_eval_count``, ``eval_count``): there is no
  running count and no tokenize route to ask;
- ``keep_alive`` and the runner options (``num_ctx``, ``num_batch``, ``num_gpu``,
  ``main_gpu``, ``use_mmap``, ``use_mlock``, ``num_thread``, ``numa``, ``low_vram``,
  ``vocab_only``, ``f16_kv``, ``draft_num_predict``) reload or unload the model for everyone:
  load-time options.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from paygate.upstream.engines.base import (
    OPENAI_ROUTES,
    ContainerDefaults,
    ContainerLaunch,
    EngineKind,
    LaunchTarget,
    ModelDigest,
    OpenAICompatible,
    ProfileError,
    ServedRoute,
    file_digest,
    listed_names,
    route_table,
)
from paygate.upstream.engines.limits import SINGLE_LIMIT_KEYS, ApiShape, EngineLimit, stated

_RUNNER_OPTIONS = (
    "num_ctx", "num_batch", "num_gpu", "main_gpu", "use_mmap", "use_mlock",
    "num_thread", "numa", "low_vram", "vocab_only", "f16_kv", "draft_num_predict",
)  # fmt: skip
_LOAD_OPTIONS = frozenset({"keep_alive", *(f"options.{name}" for name in _RUNNER_OPTIONS)})

MODEL_LAYER = "application/vnd.ollama.image.model"
# Also names the blob file: nothing but hex may reach a path.
_LAYER_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
DEFAULT_REGISTRY = ("registry.ollama.ai", "library")
_MAX_MANIFEST = 1 << 20
_MAX_MANIFESTS = 10_000

OLLAMA_ROUTES = route_table(
    "ollama",
    post=("/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"),
    get=("/api/tags", "/api/version"),
)


class OllamaProfile(OpenAICompatible):
    # Ollama keeps a runner's context between requests and offers no per-request cache control
    # (cache_controls), no further APIs, no running usage and no tokenize route.
    kind: EngineKind = "ollama"
    health_path: str = "/api/version"
    models_path: str = "/api/tags"
    pull_path: str | None = "/api/pull"
    container: ContainerDefaults | None = ContainerDefaults(
        image="ollama/ollama", port=11434, models_dir="/root/.ollama", name="paygate-ollama"
    )

    def routes(self) -> tuple[ServedRoute, ...]:
        return OPENAI_ROUTES + OLLAMA_ROUTES

    def model_names(self, listing: Any) -> list[str]:
        return listed_names(listing, "models", "name")

    def digests(self, model_path: Path | None, model_name: str | None) -> list[ModelDigest]:
        """Every pulled model's weights digest; ``model_path`` is Ollama's models directory
        (``OLLAMA_MODELS``, the one holding ``manifests/`` and ``blobs/``), ``model_name``
        limits it to one. Each model blob is hashed and must match its manifest."""
        if model_path is None:
            return []
        found = manifest_digests(model_path / "manifests")
        if model_name is not None:
            wanted = model_name if ":" in model_name else model_name + ":latest"
            found = [d for d in found if d.name == wanted]
            if not found:
                raise ProfileError(f"no manifest for {wanted} under {model_path}")
        for model in found:
            check_blob(model_path / "blobs", model)
        return found

    def launch(self, target: LaunchTarget) -> ContainerLaunch:
        models = f"{target.models_dir.rstrip('/')}/models"
        environment = {"OLLAMA_HOST": f"{target.listen}:{target.port}", "OLLAMA_MODELS": models}
        return ContainerLaunch(command=(), environment=environment)

    # --- generation (see the module docstring) ---

    def limit_keys(self, api: ApiShape) -> tuple[str, ...]:
        if api in SINGLE_LIMIT_KEYS:
            return ()  # no /v1/responses, /v1/messages (api_routes)
        return ("options.num_predict",) if api == "ollama" else ("max_tokens",)

    def known_keys(self, api: ApiShape) -> frozenset[str]:
        if api in SINGLE_LIMIT_KEYS:
            return frozenset()
        if api == "ollama":
            return frozenset({"options.num_predict"})
        return frozenset({"max_tokens", "max_completion_tokens", "n", "best_of"})

    def limit(self, api: ApiShape, data: Mapping[str, Any]) -> EngineLimit:
        value = stated(data, self.limit_keys(api)[0])
        return EngineLimit(value if value is not None and value > 0 else None)

    def dropped_keys(self, api: ApiShape) -> tuple[str, ...]:
        return ("n", "best_of") if api == "openai" else ()

    def load_options(self, api: ApiShape) -> frozenset[str]:
        return _LOAD_OPTIONS if api == "ollama" else frozenset()


def manifest_digests(manifests: Path) -> list[ModelDigest]:
    """``name:tag`` → model layer digest for every manifest under ``manifests/host/ns/name/tag``.

    Models of the default registry and namespace are named as ``/api/tags`` names them
    (``llama3:8b``); others keep their full path (``host/ns/name:tag``).
    """
    if not manifests.is_dir():
        return []
    out: list[ModelDigest] = []
    for path in sorted(manifests.glob("*/*/*/*"))[:_MAX_MANIFESTS]:
        if not path.is_file():
            continue
        host, namespace, name, tag = path.relative_to(manifests).parts
        label = f"{name}:{tag}" if (host, namespace) == DEFAULT_REGISTRY else (
            f"{host}/{namespace}/{name}:{tag}"
        )  # fmt: skip
        digest = model_layer_digest(path)
        if digest is not None:
            out.append(ModelDigest(label, digest))
    return out


def model_layer_digest(manifest: Path) -> str | None:
    """The digest of the manifest's model layer, or None if it has none (not a model)."""
    try:
        with manifest.open("rb") as fh:
            document = json.loads(fh.read(_MAX_MANIFEST))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ProfileError(f"unreadable Ollama manifest {manifest.name}: {exc}") from None
    layers = document.get("layers") if isinstance(document, dict) else None
    for layer in layers if isinstance(layers, list) else []:
        if isinstance(layer, dict) and layer.get("mediaType") == MODEL_LAYER:
            digest = layer.get("digest")
            if isinstance(digest, str) and _LAYER_DIGEST.fullmatch(digest):
                return digest
            raise ProfileError(f"Ollama manifest {manifest.name}: the model layer's digest is bad")
    return None


def check_blob(blobs: Path, model: ModelDigest) -> None:
    """The model's blob (``blobs/sha256-<hex>``, as Ollama stores it) has the manifest's digest:
    the bytes Ollama loads are the bytes attested (blocking: a blob is gigabytes)."""
    blob = blobs / model.digest.replace(":", "-", 1)
    if not blob.is_file():
        raise ProfileError(f"the weights of {model.name} are missing: no blob {blob.name}")
    actual = file_digest(blob)
    if actual != model.digest:
        raise ProfileError(
            f"the weights of {model.name} do not match their manifest: the blob hashes to "
            f"{actual}, the manifest names {model.digest}"
        )
