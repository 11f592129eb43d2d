"""Is the model server up? One probe, and a wait with a deadline.

The probe asks each server kind the question it answers cheaply (its engine profile's
``health_path``: Ollama ``/api/version``, llama.cpp's server and vLLM ``/health``, any other
OpenAI-compatible server ``/v1/models``).
Only a 2xx counts as ready (a 401 from a remote server means the API key is wrong, which is
not ready either). The API key, when there is one, rides in the probe like in every request.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from paygate.upstream.errors import UpstreamNotReady

_POLL = 0.2  # seconds between probes while waiting for readiness


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe's outcome. ``detail`` is a fixed short text or an HTTP status, never a body."""

    ok: bool
    reachable: bool
    detail: str


async def probe(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
) -> ProbeResult:
    """GET ``url``: ok on 2xx; ``reachable`` whenever any HTTP answer came back."""
    try:
        async with asyncio.timeout(timeout):
            async with session.get(
                url,
                allow_redirects=False,
                headers={"Accept-Encoding": "identity", **(headers or {})},
            ) as response:
                await response.read()
                ok = 200 <= response.status < 300
                return ProbeResult(ok=ok, reachable=True, detail=f"http {response.status}")
    except TimeoutError:
        return ProbeResult(ok=False, reachable=False, detail="timeout")
    except aiohttp.ClientConnectorError:
        return ProbeResult(ok=False, reachable=False, detail="connection refused")
    except aiohttp.ClientError:
        return ProbeResult(ok=False, reachable=False, detail="broken response")


async def wait_ready(
    session: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    deadline: float,
    probe_timeout: float = 2.0,
) -> None:
    """Probe ``url`` until it is ready; UpstreamNotReady after ``deadline`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    last = ProbeResult(ok=False, reachable=False, detail="not probed")
    while loop.time() < end:
        last = await probe(
            session, url, headers=headers, timeout=min(probe_timeout, end - loop.time())
        )
        if last.ok:
            return
        await asyncio.sleep(min(_POLL, max(end - loop.time(), 0)))
    raise UpstreamNotReady(f"the model server was not ready within {deadline:g}s ({last.detail})")
