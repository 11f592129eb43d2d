"""Find model servers on this host: probe ports concurrently, tell the kinds apart, list models.

Each port gets a few GETs under one deadline. The kinds are told apart by what only they
answer (the reference gateway looked at ``/health`` alone and so called vLLM llama-server):

- llama-server: ``/props`` (llama.cpp's server settings), or models ``owned_by: llamacpp``.
  Checked first: a real llama-server also answers ``/api/tags`` with a ``models`` list;
- ollama: ``/api/tags`` with a ``models`` list and ``/api/version`` with a ``version``;
- vllm: ``/version`` with a ``version``, or models ``owned_by: vllm`` (vLLM's ``/health`` is an
  empty 200, llama-server's is JSON, so ``/health`` alone decides nothing);
- openai: any other server with an OpenAI ``/v1/models`` list (LM Studio, LiteLLM ...);
- http: something answers HTTP but is none of these.

Replies are read up to a bound and parsed as JSON defensively; a port that refuses or times
out is simply not listed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp

from paygate import jsonsafe

DEFAULT_PORTS = (8080, 11434, 8000, 1234, 4000)  # llama-server, ollama, vllm, lm-studio, litellm
MAX_REPLY = 1 << 20  # bytes read of any one probe reply
MAX_MODELS = 200
Kind = Literal["ollama", "vllm", "llama-server", "openai", "http"]


@dataclass(frozen=True, slots=True)
class Found:
    """One model server: where, what, and the models it lists."""

    port: int
    url: str
    kind: Kind
    models: tuple[str, ...] = field(default=())
    version: str | None = None
    model_path: str | None = None  # llama-server: the file it loaded (/props model_path)


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any] | None:
    """``(status, parsed JSON or None)``, or None if nothing answered HTTP."""
    try:
        async with session.get(url, allow_redirects=False) as response:
            body = await response.content.read(MAX_REPLY)
            status = response.status
    except (aiohttp.ClientError, OSError):
        return None
    try:
        return status, jsonsafe.loads(body, max_bytes=MAX_REPLY) if body else None
    except (ValueError, UnicodeDecodeError):
        return status, None


def _openai_models(reply: tuple[int, Any] | None) -> tuple[list[str], set[str]] | None:
    """Model ids and ``owned_by`` values of an OpenAI model list, or None if it is not one."""
    if reply is None or reply[0] != 200 or not isinstance(reply[1], dict):
        return None
    data = reply[1].get("data")
    if not isinstance(data, list):
        return None
    cards = [card for card in data if isinstance(card, dict)]
    ids = [str(card["id"]) for card in cards if isinstance(card.get("id"), str)]
    owners = {str(card.get("owned_by", "")).lower() for card in cards}
    return ids, owners


def _ollama_models(reply: tuple[int, Any] | None) -> list[str] | None:
    if reply is None or reply[0] != 200 or not isinstance(reply[1], dict):
        return None
    models = reply[1].get("models")
    if not isinstance(models, list):
        return None
    return [
        str(m["name"]) for m in models if isinstance(m, dict) and isinstance(m.get("name"), str)
    ]


def _version(reply: tuple[int, Any] | None) -> str | None:
    if reply is None or reply[0] != 200 or not isinstance(reply[1], dict):
        return None
    value = reply[1].get("version")
    return str(value) if isinstance(value, str | int | float) else None


async def probe_port(
    session: aiohttp.ClientSession, host: str, port: int, timeout: float
) -> Found | None:
    """What listens on ``host:port``, or None if no HTTP server answers in ``timeout``."""
    base = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    try:
        async with asyncio.timeout(timeout):
            tags = await _get_json(session, base + "/api/tags")
            if tags is None:
                return None  # refused or not HTTP: nothing more to ask
            models, version_reply, props, ollama_version = await asyncio.gather(
                _get_json(session, base + "/v1/models"),
                _get_json(session, base + "/version"),
                _get_json(session, base + "/props"),
                _get_json(session, base + "/api/version"),
            )
    except TimeoutError:
        return None
    listed = _openai_models(models)
    ids, owners = listed if listed is not None else ([], set())
    found_ids = tuple(ids[:MAX_MODELS])
    # llama-server answers /api/tags with a "models" list too (and /v1/models carries one),
    # so it is recognised first, by what only it answers: /props, or owned_by llamacpp.
    is_llama = props is not None and props[0] == 200 and isinstance(props[1], dict)
    if is_llama or "llamacpp" in owners:
        return Found(port, base, "llama-server", found_ids, _build(props), _model_path(props))
    ollama = _ollama_models(tags)
    ollama_version = _version(ollama_version)
    if ollama is not None and (ollama_version is not None or listed is None):
        return Found(port, base, "ollama", tuple(ollama[:MAX_MODELS]), ollama_version)
    version = _version(version_reply)
    if version is not None or "vllm" in owners:
        return Found(port, base, "vllm", found_ids, version)
    if listed is not None:
        return Found(port, base, "openai", found_ids)
    return Found(port, base, "http")


def _build(props: tuple[int, Any] | None) -> str | None:
    """llama-server's build (``/props`` ``build_info``, e.g. ``b1-4227c9b``)."""
    if props is None or not isinstance(props[1], dict):
        return None
    value = props[1].get("build_info")
    return value if isinstance(value, str) and len(value) <= 64 else None


def _model_path(props: tuple[int, Any] | None) -> str | None:
    if props is None or not isinstance(props[1], dict):
        return None
    value = props[1].get("model_path")
    return value if isinstance(value, str) and 0 < len(value) <= 4096 else None


async def probe_url(url: str, *, timeout: float = 2.0) -> Found | None:
    """What answers at the base ``url`` (http:// only: discovery speaks plain HTTP), or None."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return None
    try:
        port = parts.port or 80
    except ValueError:
        return None
    connector = aiohttp.TCPConnector(limit=8, force_close=True)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        return await probe_port(session, parts.hostname, port, timeout)


async def discover(
    ports: Iterable[int] = DEFAULT_PORTS, *, host: str = "127.0.0.1", timeout: float = 2.0
) -> list[Found]:
    """Probe every port at once; the servers found, by port."""
    unique = sorted(set(ports))
    connector = aiohttp.TCPConnector(limit=64, force_close=True)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        results = await asyncio.gather(*(probe_port(session, host, p, timeout) for p in unique))
    return [found for found in results if found is not None]


def rows(found: Sequence[Found]) -> list[tuple[str, ...]]:
    """The table ``paygate discover`` prints, header first."""
    out = [("PORT", "KIND", "VERSION", "MODELS", "URL")]
    for item in found:
        models = ", ".join(item.models[:5]) + (" ..." if len(item.models) > 5 else "")
        out.append((str(item.port), item.kind, item.version or "-", models or "-", item.url))
    return out
