"""The docker engine connection (the docker SDK, blocking: async callers use a thread)."""

from __future__ import annotations

import os

import docker
import docker.errors

from paygate.upstream.errors import ContainerFailed, DockerUnavailable

API_TIMEOUT = 60  # seconds for one engine API call (a container stop waits up to 10 s inside)


def connect(docker_host: str | None) -> docker.DockerClient:
    """A client for ``docker_host`` (else ``DOCKER_HOST``, else the default socket), pinged."""
    where = docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
    try:
        if docker_host:
            client = docker.DockerClient(base_url=docker_host, timeout=API_TIMEOUT)
        else:
            client = docker.from_env(timeout=API_TIMEOUT)
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        raise DockerUnavailable(
            f"cannot reach the docker engine at {where} ({type(exc).__name__})"
        ) from None
    return client


def failure(action: str, exc: Exception) -> ContainerFailed:
    """A docker API error as a ContainerFailed that says what was being done and why."""
    reason = getattr(exc, "explanation", None) or type(exc).__name__
    return ContainerFailed(f"{action}: {reason}")
