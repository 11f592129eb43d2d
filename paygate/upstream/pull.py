"""``paygate upstream pull MODEL``: the one moment the model server may use the network.

A separate, short-lived container from the same image, with the same hardening and the same
model volume, but on the pull network (egress) and with its port published on 127.0.0.1
only. paygate asks it to pull (the engine profile's ``pull_path``: Ollama's
``POST /api/pull``), relays the progress, and removes it, whatever happened. Serving containers
are never given a network.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import docker
import docker.errors
from docker.models.containers import Container

from paygate import jsonsafe
from paygate.upstream.engine import failure
from paygate.upstream.engines import profile_for
from paygate.upstream.errors import PullFailed
from paygate.upstream.readiness import wait_ready
from paygate.upstream.spec import ROLE_LABEL, ContainerSpec, pull_kwargs

MAX_LINE = 64 * 1024  # bytes of one progress line


@dataclass(frozen=True, slots=True)
class Progress:
    """One progress line from the model server."""

    status: str
    completed: int | None = None
    total: int | None = None


def _ensure_network(client: docker.DockerClient, name: str) -> None:
    try:
        client.networks.get(name)
    except docker.errors.NotFound:
        try:
            client.networks.create(name, driver="bridge", labels={ROLE_LABEL: "pull"})
        except docker.errors.APIError as exc:
            raise failure(f"create network {name}", exc) from None


def _start(client: docker.DockerClient, spec: ContainerSpec) -> tuple[Container, int]:
    _ensure_network(client, spec.pull_network)
    with contextlib.suppress(docker.errors.NotFound):
        stale = client.containers.get(spec.pull_name)
        if ROLE_LABEL not in (stale.labels or {}):
            raise PullFailed(f"a container named {spec.pull_name} exists and is not paygate's")
        stale.remove(force=True)
    try:
        container = client.containers.run(**pull_kwargs(spec))
        container.reload()
        binding = container.attrs["NetworkSettings"]["Ports"][f"{spec.port}/tcp"][0]
    except docker.errors.APIError as exc:
        raise failure(f"start {spec.pull_name}", exc) from None
    except (KeyError, IndexError, TypeError):
        raise PullFailed("the pull container's port was not published") from None
    return container, int(binding["HostPort"])


def _remove(container: Container) -> None:
    with contextlib.suppress(docker.errors.APIError):
        container.remove(force=True)


async def pull(
    client: docker.DockerClient,
    spec: ContainerSpec,
    model: str,
    *,
    on_progress: Callable[[Progress], None],
    ready_timeout: float,
    timeout: float,
) -> None:
    """Pull ``model`` into the deployment's volume; PullFailed with the server's reason.

    Only engines whose profile has a ``pull_path`` (Ollama) download models themselves; the
    others serve the file named by ``upstream_model_path``, which the operator provides.
    """
    profile = profile_for(spec.kind)
    if profile.pull_path is None:
        raise PullFailed(
            f"{spec.kind} cannot pull models: put the weights file on this host and set "
            "upstream_model_path"
        )
    container, port = await asyncio.to_thread(_start, client, spec)
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession(trust_env=False) as session:
            await wait_ready(session, base + profile.health_path, deadline=ready_timeout)
            async with asyncio.timeout(timeout):
                await _stream_pull(session, base + profile.pull_path, model, on_progress)
    except TimeoutError:
        raise PullFailed(f"the pull did not finish within {timeout:g}s") from None
    finally:
        await asyncio.to_thread(_remove, container)


async def _stream_pull(
    session: aiohttp.ClientSession,
    url: str,
    model: str,
    on_progress: Callable[[Progress], None],
) -> None:
    async with session.post(
        url, json={"model": model, "stream": True}, read_bufsize=MAX_LINE
    ) as response:
        if response.status != 200:
            raise PullFailed(f"the model server refused the pull (http {response.status})")
        last = ""
        while True:
            try:
                line = await response.content.readline()
            except ValueError:
                raise PullFailed("a progress line was too long") from None
            if not line:
                break
            if not line.strip():
                continue
            try:
                event = jsonsafe.loads(line, max_bytes=MAX_LINE)
            except ValueError:
                raise PullFailed("the model server sent malformed progress") from None
            if not isinstance(event, dict):
                continue
            if "error" in event:
                raise PullFailed(f"the model server could not pull {model}: {event['error']}")
            last = str(event.get("status", ""))
            completed, total = event.get("completed"), event.get("total")
            on_progress(
                Progress(
                    status=last,
                    completed=completed if isinstance(completed, int) else None,
                    total=total if isinstance(total, int) else None,
                )
            )
        if last != "success":
            raise PullFailed("the pull ended before the model server reported success")
