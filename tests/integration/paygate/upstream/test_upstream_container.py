"""Container mode on a real Docker engine: isolation, limits, lifecycle (docs/UPSTREAM.md).

One gateway (and so one serving container with its relay) is shared by the module, in the
order a deployment lives: serve, inspect, probe egress, crash and recover, stop. The model
server in the container is the FAKE (devtools/paygate_dev/fake_model.py) on Ollama's port.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import docker
import pytest
import pytest_asyncio
from paygate_dev.docker_stack import Dockerd
from paygate_dev.fake_model import reply_words

from paygate.cli.main import main as cli
from paygate.upstream.spec import container_spec
from tests.fixtures.docker import DockerImages
from tests.fixtures.upstream_support import (
    CHAT,
    Gateway,
    container_settings,
    listener,
    run_probe,
    running_gateway,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
PUBLIC_ADDRESS = "203.0.113.7"  # TEST-NET-3: a public-range address that belongs to no one


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(dockerd: Dockerd, test_images: DockerImages) -> AsyncIterator[Gateway]:
    settings = container_settings(dockerd, test_images)
    async with running_gateway(settings) as gw:
        yield gw


def _containers(client: docker.DockerClient, gw: Gateway) -> tuple[Any, Any]:
    spec = container_spec(gw.settings.upstream())
    return client.containers.get(spec.name), client.containers.get(spec.relay_name)


async def test_the_gateway_reaches_the_model_server_in_the_container(gateway: Gateway) -> None:
    resp = await gateway.client.post(gateway.url + "/api/chat", json=CHAT)
    assert resp.status == 200
    reply = await resp.json()
    assert reply["message"]["content"] == " " + " ".join(reply_words("hi", 4))
    ready = await gateway.client.get(gateway.url + "/health/ready")
    body = await ready.json()
    assert ready.status == 200, body
    assert body["upstream"]["mode"] == "container"
    assert body["upstream"]["state"] == "ready"
    assert body["upstream"]["breaker"]["state"] == "closed"


async def test_limits_capabilities_and_no_network_as_configured(
    gateway: Gateway, docker_client: docker.DockerClient
) -> None:
    serving, relay = _containers(docker_client, gateway)
    host = serving.attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert not host["CapAdd"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert host["NanoCpus"] == 500_000_000
    assert host["Memory"] == host["MemorySwap"] == 256 * 1024 * 1024
    assert host["PidsLimit"] == 64
    assert host["Privileged"] is False
    assert "/tmp" in host["Tmpfs"]
    assert "noexec" in host["Tmpfs"]["/tmp"]
    assert not host["PortBindings"]
    assert not serving.attrs["NetworkSettings"]["Ports"]
    assert not host.get("DeviceRequests")
    mounts = {m["Destination"]: m for m in serving.attrs["Mounts"]}
    assert mounts["/root/.ollama"]["Type"] == "volume"
    assert mounts["/root/.ollama"]["Name"] == gateway.settings.upstream_volume
    assert list(serving.attrs["NetworkSettings"]["Networks"]) == ["none"]

    relay_host = relay.attrs["HostConfig"]
    assert relay_host["NetworkMode"] == f"container:{serving.id}"
    assert relay_host["ReadonlyRootfs"] is True
    assert relay_host["CapDrop"] == ["ALL"]
    assert relay.attrs["Config"]["User"] == f"{os.getuid()}:{os.getgid()}"
    socket_dir = container_spec(gateway.settings.upstream()).socket_dir
    assert oct(socket_dir.stat().st_mode & 0o777) == "0o700"
    assert oct((socket_dir / "upstream.sock").stat().st_mode & 0o777) == "0o600"


async def test_nothing_listens_beyond_the_containers_own_loopback(
    gateway: Gateway, docker_client: docker.DockerClient, test_images: DockerImages
) -> None:
    serving, _ = _containers(docker_client, gateway)
    # In the container's network namespace: only loopback, no route, one listener on 127.0.0.1.
    out = run_probe(
        docker_client,
        test_images.busybox,
        "ip -o addr; echo ROUTES; ip route; echo LISTEN; netstat -ltn",
        network_mode=f"container:{serving.id}",
    )
    addresses, _, rest = out.partition("ROUTES")
    routes, _, listening = rest.partition("LISTEN")
    assert " lo " in addresses
    assert "eth" not in addresses
    assert routes.strip() == ""
    listeners = [line.split()[3] for line in listening.splitlines() if "LISTEN" in line]
    assert listeners == ["127.0.0.1:11434"]
    # On the host: docker published nothing (no port bindings, no docker-proxy of this engine).
    for container in docker_client.containers.list():
        assert not container.attrs["HostConfig"]["PortBindings"], container.name
    proxies = [
        pid
        for pid in os.listdir("/proc")
        if pid.isdigit() and _command(pid).startswith("docker-proxy")
    ]
    assert proxies == []


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return os.path.basename(fh.read().split(b"\0")[0].decode(errors="replace"))
    except OSError:
        return ""


async def test_egress_from_the_container_fails(
    gateway: Gateway, docker_client: docker.DockerClient, test_images: DockerImages
) -> None:
    serving, _ = _containers(docker_client, gateway)
    # A host address outside the container's network: the gateway address of a second,
    # ordinary bridge network on this machine (host-only; nothing leaves the machine).
    outside = docker_client.networks.create(f"{serving.name}-outside", driver="bridge")
    try:
        outside.reload()
        host_address = outside.attrs["IPAM"]["Config"][0]["Gateway"]
        with listener(host_address) as (port, peers):
            probe = (
                f"nc -w 2 {host_address} {port} </dev/null && echo HOST-REACHED; "
                f"nc -w 2 {PUBLIC_ADDRESS} 80 </dev/null && echo PUBLIC-REACHED; "
                f"wget -q -T 2 -O - http://{PUBLIC_ADDRESS}/ && echo HTTP-REACHED; echo DONE"
            )
            isolated = run_probe(
                docker_client, test_images.busybox, probe, network_mode=f"container:{serving.id}"
            )
            assert "DONE" in isolated
            assert "REACHED" not in isolated, isolated
            assert "unreachable" in isolated.lower()  # refused by the kernel, nothing sent
            # Control: the same probe from a container on the ordinary network gets through,
            # so the listener works and the failure above is the isolation.
            control = run_probe(
                docker_client,
                test_images.busybox,
                f"nc -w 2 {host_address} {port} </dev/null && echo HOST-REACHED",
                network=outside.name,
            )
            assert "HOST-REACHED" in control
            deadline = time.monotonic() + 5
            while not peers and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert len(peers) == 1  # only the control connected
    finally:
        outside.remove()


async def test_upstream_status_command(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    env = {
        "PAYGATE_UPSTREAM_MODE": "container",
        "PAYGATE_DOCKER_HOST": gateway.settings.docker_host or "",
        "PAYGATE_UPSTREAM_NAME": gateway.settings.upstream_name,
        "PAYGATE_UPSTREAM_IMAGE": gateway.settings.upstream_image,
        "PAYGATE_UPSTREAM_SOCKET_DIR": str(gateway.settings.upstream_socket_dir),
    }
    with _environment(env):
        code = await asyncio.to_thread(cli, ["upstream", "status"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "serving  state=running" in out
    assert "relay    state=running" in out
    assert "health   ready" in out


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


async def test_a_crash_is_answered_503_then_restarted_and_ready(
    gateway: Gateway, docker_client: docker.DockerClient
) -> None:
    serving, _ = _containers(docker_client, gateway)
    started = serving.attrs["State"]["StartedAt"]
    await asyncio.to_thread(serving.kill)  # SIGKILL: a crash, not a stop
    refused = None
    async with asyncio.timeout(15):
        while refused is None:
            began = time.monotonic()
            resp = await gateway.client.post(gateway.url + "/api/chat", json=CHAT)
            if resp.status == 503 and resp.headers.get("X-Paygate-Error") == "upstream_down":
                refused = (resp, time.monotonic() - began)
            await asyncio.sleep(0.02)
    resp, elapsed = refused
    assert resp.headers["Retry-After"] == "2"
    assert await resp.json() == {"error": "the model server is down; retry later"}
    assert elapsed < 0.5  # answered at once, no connect attempt
    async with asyncio.timeout(30):
        while True:
            ready = await gateway.client.get(gateway.url + "/health/ready")
            body = await ready.json()
            if ready.status == 200:
                break
            assert body["upstream"]["state"] in ("down", "restarting", "ready"), body
            await asyncio.sleep(0.1)
    assert body["upstream"]["restarts"] >= 1
    assert body["upstream"]["breaker"]["trips"] >= 1
    serving.reload()
    assert serving.status == "running"
    assert serving.attrs["State"]["StartedAt"] != started
    resp = await gateway.client.post(gateway.url + "/api/chat", json=CHAT)
    assert resp.status == 200


async def test_stop_removes_the_containers_and_keeps_the_models(
    dockerd: Dockerd, test_images: DockerImages, docker_client: docker.DockerClient
) -> None:
    settings = container_settings(dockerd, test_images)
    spec = container_spec(settings.upstream())
    async with running_gateway(settings) as gw:
        assert (await gw.client.get(gw.url + "/api/tags")).status == 200
        assert spec.socket_path.exists()
    names = {c.name for c in docker_client.containers.list(all=True)}
    assert spec.name not in names
    assert spec.relay_name not in names
    assert not spec.socket_path.exists()
    docker_client.volumes.get(settings.upstream_volume).remove()
