"""The upstream as the gateway runs it: where it is, how to reach it, and its health.

:func:`running_upstream` is what the app factory enters: in container mode it starts the
isolated containers and waits (with a deadline) until the model server answers; in attach
mode it probes the configured server once. Either way a :class:`HealthMonitor` then runs in
the background, and the :class:`CircuitBreaker` it drives is the one the proxy consults.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
from pydantic import SecretStr

from paygate import jsonsafe
from paygate.upstream.breaker import CircuitBreaker
from paygate.upstream.config import UpstreamConfig
from paygate.upstream.container import ContainerManager
from paygate.upstream.engine import connect
from paygate.upstream.engines import profile_for
from paygate.upstream.engines.base import ModelDigest
from paygate.upstream.errors import ModelDigestMismatch
from paygate.upstream.http1 import Endpoint
from paygate.upstream.monitor import HealthMonitor
from paygate.upstream.readiness import ProbeResult, probe, wait_ready
from paygate.upstream.spec import container_spec

log = logging.getLogger("paygate.upstream")
_MAX_PROPS = 1 << 20  # bytes of a /props reply read (it carries the chat template)
_MAX_SLOTS = 4096


def base_url(config: UpstreamConfig) -> str:
    """The URL requests are built on: the relay socket's ``localhost`` in container mode."""
    if config.mode == "container":
        return container_spec(config).base_url
    return config.url


def health_url(config: UpstreamConfig) -> str:
    """The readiness probe's URL: the engine profile's route unless overridden."""
    return base_url(config) + (config.health_path or profile_for(config.kind).health_path)


def served_digests(config: UpstreamConfig, manager: ContainerManager | None) -> list[ModelDigest]:
    """The digests of the weights served (blocking: hashing reads the whole file).

    From ``upstream_model_path`` in both modes; for Ollama in container mode with no path
    given, from the manifests in the deployment's volume (readable when paygate runs as root,
    which docker access amounts to anyway).
    """
    profile = profile_for(config.kind)
    path = config.model_path
    if path is None and manager is not None and profile.pull_path is not None:
        path = manager.volume_path()
    return profile.digests(path, config.model_name)


def check_digests(expected: Mapping[str, str], served: list[ModelDigest]) -> None:
    """ModelDigestMismatch unless every expected model is served with exactly that digest."""
    have = {item.name: item.digest for item in served}
    wrong = [
        f"{name}: expected {digest}, served {have.get(name, 'nothing')}"
        for name, digest in sorted(expected.items())
        if have.get(name) != digest
    ]
    if wrong:
        raise ModelDigestMismatch(
            "the served weights differ from expected_model_digests: " + "; ".join(wrong)
        )


def connector(config: UpstreamConfig, *, limit: int) -> aiohttp.BaseConnector:
    """The session's connector: the relay's unix socket in container mode, TCP otherwise."""
    if config.mode == "container":
        return aiohttp.UnixConnector(path=str(container_spec(config).socket_path), limit=limit)
    return aiohttp.TCPConnector(limit=limit, enable_cleanup_closed=True)


def endpoint(config: UpstreamConfig) -> Endpoint:
    """Where the forwarding pool connects: the relay's unix socket in container mode, else the
    configured URL (TCP, TLS for https)."""
    if config.mode == "container":
        spec = container_spec(config)
        return Endpoint.from_url(spec.base_url, unix_path=str(spec.socket_path))
    return Endpoint.from_url(config.url)


def auth_headers(key: SecretStr | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}


class UpstreamService:
    """The upstream's runtime parts; ``status()`` is what ``/health/ready`` shows.

    ``monitored`` is False only for an attached server with ``upstream_monitor = false`` (a
    remote API billed per call, say): then nothing probes it and there is no breaker.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        session: aiohttp.ClientSession,
        manager: ContainerManager | None = None,
    ) -> None:
        self.config = config
        self.session = session
        self.manager = manager
        self.monitored = manager is not None or config.monitor
        breaker = CircuitBreaker(
            threshold=config.failure_threshold, retry_after=config.retry_after_seconds
        )
        self.breaker: CircuitBreaker | None = breaker if self.monitored else None
        self._url = health_url(config)
        self.api_key = config.api_key
        self.monitor = HealthMonitor(
            check=self.check,
            breaker=breaker,
            interval=config.health_interval,
            backoff_max=config.restart_backoff_max,
            crashed=self._crashed if manager is not None else None,
            recover=self._recover if manager is not None else None,
        )
        self._task: asyncio.Task[None] | None = None
        self.models: list[ModelDigest] = []  # the weights served, with their digests

    async def check(self) -> ProbeResult:
        return await probe(
            self.session,
            self._url,
            headers=auth_headers(self.api_key),
            timeout=self.config.ready_probe_timeout,
        )

    async def _crashed(self) -> bool:
        assert self.manager is not None
        return await asyncio.to_thread(self.manager.crashed)

    async def _recover(self) -> str:
        assert self.manager is not None
        return await asyncio.to_thread(self.manager.ensure_running)

    async def verify_models(self) -> None:
        """Hash the served weights; refuse (ModelDigestMismatch) what was not expected."""
        self.models = await asyncio.to_thread(served_digests, self.config, self.manager)
        check_digests(self.config.expected_model_digests, self.models)
        for item in self.models:
            log.info("serving model %s, weights %s", item.name, item.digest)

    async def start(self) -> None:
        """Check the weights, start the containers (container mode) and wait until ready;
        then monitor. Ollama's manifests are read once its container has started."""
        from_volume = self.manager is not None and self.config.model_path is None
        if not from_volume:
            await self.verify_models()
        if self.manager is not None:
            await asyncio.to_thread(self.manager.start)
            await wait_ready(
                self.session,
                self._url,
                deadline=self.config.ready_timeout,
                probe_timeout=self.config.ready_probe_timeout,
            )
            self.monitor.mark_ready()
            if from_volume:
                await self.verify_models()
        elif not self.monitored:
            return
        else:
            # An attached server may come later: start anyway, refusing fast once it is down.
            result = await self.check()
            if result.ok:
                self.monitor.mark_ready()
            else:
                self.monitor.mark_down(result.detail)
                log.warning("the attached model server is not ready yet (%s)", result.detail)
        self._task = asyncio.get_running_loop().create_task(self.monitor.run())

    async def stop(self) -> None:
        """Stop monitoring; in container mode stop and remove the containers."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.monitor.state = "stopped"
        if self.manager is not None:
            await asyncio.to_thread(self.manager.stop)

    def status(self) -> dict[str, Any]:
        if not self.monitored:
            return {"mode": self.config.mode, "state": "unmonitored"}
        out: dict[str, Any] = {"mode": self.config.mode, **self.monitor.snapshot()}
        out["kind"] = self.config.kind
        return out

    async def slot_count(self, path: str, *, timeout: float) -> int | None:
        """How many slots the server runs (llama-server's ``/props`` ``total_slots``), or None
        when it does not say (unreachable, not JSON, no such field)."""
        try:
            async with asyncio.timeout(timeout):
                async with self.session.get(
                    base_url(self.config) + path,
                    allow_redirects=False,
                    headers={"Accept-Encoding": "identity", **auth_headers(self.api_key)},
                ) as response:
                    if response.status != 200:
                        return None
                    document = jsonsafe.loads(
                        await response.content.read(_MAX_PROPS),
                        max_bytes=_MAX_PROPS,
                        max_depth=None,
                    )
        except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError):
            return None
        count = document.get("total_slots") if isinstance(document, dict) else None
        if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= _MAX_SLOTS:
            return count
        return None

    def models_document(self) -> list[dict[str, str]]:
        """``[{"name", "digest"}]`` of the weights served (public: what attestation binds)."""
        return [item.as_dict() for item in self.models]


@contextlib.asynccontextmanager
async def running_upstream(
    config: UpstreamConfig, session: aiohttp.ClientSession
) -> AsyncIterator[UpstreamService]:
    """The upstream service, started; stopped (containers removed) on exit."""
    manager = None
    client = None
    if config.mode == "container":
        client = await asyncio.to_thread(connect, config.docker_host)
        manager = ContainerManager(client, container_spec(config))
    service = UpstreamService(config, session, manager)
    try:
        await service.start()
        yield service
    finally:
        try:
            await service.stop()
        finally:
            if client is not None:
                client.close()
