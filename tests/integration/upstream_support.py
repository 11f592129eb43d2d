"""A gateway in container mode on the session's real dockerd (helpers for the upstream tests)."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import docker
from aiohttp import web
from paygate_dev.docker_stack import Dockerd

from enclave import SoftwareKey
from paygate.config import Settings, load_settings
from paygate.server.app import build_app, server_options
from tests.fixtures.docker import DockerImages

TIMEOUT = aiohttp.ClientTimeout(total=20)
CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}], "stream": False}


@dataclass
class Gateway:
    settings: Settings
    url: str
    client: aiohttp.ClientSession


def container_settings(dockerd: Dockerd, images: DockerImages, **overrides: Any) -> Settings:
    """Container-mode settings with a unique name, volume and a short socket directory."""
    token = secrets.token_hex(3)
    socket_dir = Path(tempfile.mkdtemp(prefix="pgs-", dir="/tmp"))  # sun_path is short
    values: dict[str, Any] = {
        "upstream_mode": "container",
        "docker_host": dockerd.host,
        "upstream_image": images.fake_ollama,
        "upstream_relay_image": images.fake_ollama,
        "upstream_name": f"pgtest-{token}",
        "upstream_volume": f"pgtest-{token}-models",
        "upstream_socket_dir": socket_dir,
        "upstream_cpus": 0.5,
        "upstream_memory": "256m",
        "upstream_pids_limit": 64,
        "upstream_health_interval": 0.3,
        "upstream_ready_timeout": 30.0,
        "upstream_restart_backoff_max": 2.0,
        "retry_after_seconds": 2,
    }
    values.update(overrides)
    return load_settings(None, **values)


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """The real gateway app for ``settings`` on a loopback port (containers start with it)."""
    app = build_app(settings, key=SoftwareKey.generate())
    runner = web.AppRunner(app, shutdown_timeout=2.0, **server_options(settings))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession(timeout=TIMEOUT) as client:
            yield Gateway(settings, f"http://{host}:{port}", client)
    finally:
        await runner.cleanup()
        shutil.rmtree(settings.upstream_socket_dir, ignore_errors=True)


def run_probe(client: docker.DockerClient, image: str, script: str, **kwargs: Any) -> str:
    """Run ``sh -c script`` in a throw-away busybox container; its output."""
    container = client.containers.run(image, ["sh", "-c", script], detach=True, **kwargs)
    try:
        container.wait(timeout=30)
        return container.logs().decode(errors="replace")
    finally:
        container.remove(force=True)


@contextlib.contextmanager
def listener(address: str) -> Iterator[tuple[int, list[str]]]:
    """A TCP listener on a host address; yields its port and the peers that connected."""
    server = socket.socket()
    server.bind((address, 0))
    server.listen(8)
    server.settimeout(0.2)
    peers: list[str] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, peer = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peers.append(peer[0])
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], peers
    finally:
        stop.set()
        thread.join(5)
        server.close()
