"""Two container-mode upstreams behind one gateway, on the session's real dockerd.

One deployment of each engine kind: the FAKE model server in Ollama's place (model
``fake-llama``) and the real llama-server with the tiny weights (model ``tiny``), each its own
isolated serving container with its own relay and socket (docs/UPSTREAM.md, "Several model
servers" and "Container mode"). One gateway is shared by the module, in the order a set lives:
route, inspect, report, crash one and recover; its exit must leave no container behind. Which
deployment answered is read from the deployment itself: the FAKE's own request counts (asked
through its relay socket) and llama-server's own request log (its container's output).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import docker
import pytest
import pytest_asyncio
from paygate_dev.docker_stack import Dockerd
from paygate_dev.fake_model import STATS_PATH, reply_words
from paygate_dev.llama import TINY_REPLY, LlamaBuild

from paygate import wire
from paygate.cli.main import main as cli
from paygate.upstream.spec import DEPLOYMENT_LABEL, ContainerSpec, container_spec
from tests.fixtures.docker import DockerImages
from tests.fixtures.upstream_support import Gateway, container_settings, running_gateway

pytestmark = pytest.mark.asyncio(loop_scope="module")
CHAT = "/v1/chat/completions"
TOKEN = secrets.token_hex(3)
FAKE = f"t{TOKEN}-fake"  # upstream names; deployments <upstream_name>-<name>
TINY = f"t{TOKEN}-tiny"


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(
    dockerd: Dockerd,
    test_images: DockerImages,
    llama_image: str,
    llama: LlamaBuild,
    docker_client: docker.DockerClient,
) -> AsyncIterator[Gateway]:
    upstreams = [
        {"name": FAKE, "kind": "ollama", "mode": "container", "models": ["fake-llama"]},
        {
            "name": TINY,
            "kind": "llama-server",
            "mode": "container",
            "image": llama_image,
            "model_path": str(llama.tiny),
            "models": ["tiny"],
            "cpus": 1.0,
        },
    ]
    settings = container_settings(dockerd, test_images, upstreams=upstreams)
    specs = [container_spec(e.config) for e in settings.upstream_entries()]
    try:
        async with running_gateway(settings) as gw:
            yield gw
        # The gateway's exit stopped and removed every container of both deployments.
        ours = {s.name for s in specs}
        left = [
            c.name
            for c in docker_client.containers.list(all=True)
            if (c.labels or {}).get(DEPLOYMENT_LABEL) in ours
        ]
        assert left == []
        assert not any(s.socket_path.exists() for s in specs)
    finally:
        for spec in specs:  # whatever happened above: nothing of ours survives the module
            for name in (spec.relay_name, spec.name):
                with contextlib.suppress(docker.errors.NotFound):
                    docker_client.containers.get(name).remove(force=True)
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.volumes.get(spec.volume).remove(force=True)


def _specs(gw: Gateway) -> dict[str, ContainerSpec]:
    return {e.name: container_spec(e.config) for e in gw.settings.upstream_entries()}


async def _post(gw: Gateway, path: str, body: dict[str, Any]) -> tuple[int, Any, Any]:
    async with gw.client.post(gw.url + path, json=body) as response:
        return response.status, response.headers, await response.json()


async def _fake_hits(spec: ContainerSpec) -> dict[str, int]:
    """The FAKE's own request counts, asked through its deployment's relay socket."""
    connector = aiohttp.UnixConnector(path=str(spec.socket_path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(spec.base_url + STATS_PATH) as response,
    ):
        assert response.status == 200
        hits: dict[str, int] = (await response.json())["hits"]
        return hits


def _llama_served(client: docker.DockerClient, spec: ContainerSpec) -> int:
    """How many chat requests llama-server logged (its container's own output)."""
    logs = client.containers.get(spec.name).logs().decode(errors="replace")
    return sum(f"request: POST {CHAT} " in line for line in logs.splitlines())


async def test_requests_route_by_model_to_their_own_container(
    gateway: Gateway, docker_client: docker.DockerClient
) -> None:
    specs = _specs(gateway)
    fake_words = " ".join(reply_words("hi", 4))
    status, _, reply = await _post(gateway, CHAT, _chat("fake-llama"))
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"].strip() == fake_words
    status, _, reply = await _post(gateway, CHAT, _chat("tiny"))
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == TINY_REPLY
    # Ollama's native route exists only on the Ollama deployment.
    status, _, reply = await _post(gateway, "/api/chat", {**_chat("fake-llama"), "stream": False})
    assert status == 200, reply
    assert reply["message"]["content"].strip() == fake_words
    # Each request reached its own container and no other.
    hits = await _fake_hits(specs[FAKE])
    assert hits.get(f"POST {CHAT}") == 1
    assert hits.get("POST /api/chat") == 1
    assert _llama_served(docker_client, specs[TINY]) == 1
    # A name neither serves, and the native route for the model that lacks it: refused here.
    status, headers, _ = await _post(gateway, CHAT, _chat("gpt-4"))
    assert (status, headers[wire.ERROR_HEADER]) == (404, "model_not_found")
    status, headers, _ = await _post(gateway, "/api/chat", _chat("tiny"))
    assert status == 404
    assert (await _fake_hits(specs[FAKE])).get("POST /api/chat") == 1
    assert _llama_served(docker_client, specs[TINY]) == 1


async def test_models_lists_both_and_ready_shows_each(gateway: Gateway) -> None:
    async with gateway.client.get(gateway.url + "/v1/models") as response:
        assert response.status == 200
        listing = await response.json()
    assert [card["id"] for card in listing["data"]] == ["fake-llama", "tiny"]
    async with gateway.client.get(gateway.url + "/health/ready") as response:
        ready = await response.json()
    assert response.status == 200, ready
    upstreams = ready["upstream"]["upstreams"]
    assert set(upstreams) == {FAKE, TINY}
    assert upstreams[FAKE]["mode"] == upstreams[TINY]["mode"] == "container"
    assert (upstreams[FAKE]["kind"], upstreams[TINY]["kind"]) == ("ollama", "llama-server")
    assert upstreams[FAKE]["state"] == upstreams[TINY]["state"] == "ready"


async def test_each_deployment_is_isolated_from_the_network_and_from_the_other(
    gateway: Gateway, docker_client: docker.DockerClient
) -> None:
    specs = _specs(gateway)
    serving = {n: docker_client.containers.get(s.name) for n, s in specs.items()}
    relays = {n: docker_client.containers.get(s.relay_name) for n, s in specs.items()}
    for name in specs:
        host = serving[name].attrs["HostConfig"]
        assert host["NetworkMode"] == "none"
        assert list(serving[name].attrs["NetworkSettings"]["Networks"]) == ["none"]
        assert not host["PortBindings"]
        # The relay joins its own deployment's namespace, never the other's.
        assert relays[name].attrs["HostConfig"]["NetworkMode"] == f"container:{serving[name].id}"
        assert not relays[name].attrs["HostConfig"]["PortBindings"]
    # Two namespaces (two sandboxes), two socket directories, each relay mounting only its own.
    sandboxes = {c.attrs["NetworkSettings"]["SandboxKey"] for c in serving.values()}
    assert len(sandboxes) == 2
    directories = {s.socket_dir for s in specs.values()}
    assert len(directories) == 2
    for name, spec in specs.items():
        mounts = {m["Destination"]: m["Source"] for m in relays[name].attrs["Mounts"]}
        assert mounts["/run/paygate"] == str(spec.socket_dir)
        assert oct(spec.socket_dir.stat().st_mode & 0o777) == "0o700"
        assert oct(spec.socket_path.stat().st_mode & 0o777) == "0o600"
    # Own names and volumes: nothing of one deployment is named like the other's.
    names = [n for s in specs.values() for n in (s.name, s.relay_name, s.pull_name)]
    assert len(set(names)) == len(names)
    fake_mounts = {m["Destination"]: m for m in serving[FAKE].attrs["Mounts"]}
    assert fake_mounts["/root/.ollama"]["Name"] == specs[FAKE].volume
    tiny_mounts = {m["Destination"]: m for m in serving[TINY].attrs["Mounts"]}
    assert [m["Type"] for m in tiny_mounts.values()] == ["bind"]  # the weights, read-only
    assert all(m["RW"] is False for m in tiny_mounts.values())


async def test_upstream_status_reports_both(
    gateway: Gateway, capsys: pytest.CaptureFixture[str]
) -> None:
    env = _cli_environment(gateway)
    with _environment(env):
        code = await asyncio.to_thread(cli, ["upstream", "status", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(out)
    specs = _specs(gateway)
    assert set(report["upstreams"]) == {FAKE, TINY}
    for name, spec in specs.items():
        item = report["upstreams"][name]
        assert item["mode"] == "container"
        assert item["name"] == spec.name
        assert item["serving"]["state"] == "running"
        assert item["relay"]["state"] == "running"
        assert item["socket"] == str(spec.socket_path)
        assert item["health"] == "ready"
    assert report["upstreams"][FAKE]["kind"] == "ollama"
    assert report["upstreams"][TINY]["kind"] == "llama-server"
    assert report["upstreams"][TINY]["models"] == {
        "tiny": gateway_digest(await _ready(gateway), "tiny")
    }
    # The text form names each upstream before its lines.
    with _environment(env):
        code = await asyncio.to_thread(cli, ["upstream", "status"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert f"upstream {FAKE}" in text
    assert f"upstream {TINY}" in text
    assert text.count("serving  state=running") == 2


def _cli_environment(gw: Gateway, **extra: str) -> dict[str, str]:
    """The gateway's upstream settings as the CLI reads them (the environment)."""
    settings = gw.settings
    return {
        "PAYGATE_UPSTREAM_MODE": "container",
        "PAYGATE_DOCKER_HOST": settings.docker_host or "",
        "PAYGATE_UPSTREAM_IMAGE": settings.upstream_image or "",
        "PAYGATE_UPSTREAM_SOCKET_DIR": str(settings.upstream_socket_dir),
        "PAYGATE_UPSTREAM_NAME": settings.upstream_name or "",  # the deployments' names
        "PAYGATE_UPSTREAMS": json.dumps(
            [e.model_dump(mode="json", exclude_none=True) for e in settings.upstreams]
        ),
        **extra,
    }


async def _ready(gw: Gateway) -> dict[str, Any]:
    async with gw.client.get(gw.url + "/health/ready") as response:
        result: dict[str, Any] = await response.json()
        return result


def gateway_digest(ready: dict[str, Any], model: str) -> str:
    return next(m["digest"] for m in ready["models"] if m["name"] == model)


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


async def test_pull_goes_into_the_named_upstreams_volume(
    gateway: Gateway, docker_client: docker.DockerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    network = f"t{TOKEN}-pull"
    env = _cli_environment(gateway, PAYGATE_UPSTREAM_PULL_NETWORK=network)
    try:
        with _environment(env):
            # Two container upstreams: which volume is meant must be said.
            assert await asyncio.to_thread(cli, ["upstream", "pull", "fake-tiny:1b"]) == 2
            assert "--upstream" in capsys.readouterr().err
            code = await asyncio.to_thread(cli, ["upstream", "pull", "--upstream", "nobody", "x"])
            assert code == 2
            assert "no upstream named 'nobody'" in capsys.readouterr().err
            pull = ["upstream", "pull", "--upstream", FAKE, "fake-tiny:1b"]
            assert await asyncio.to_thread(cli, pull) == 0
        assert capsys.readouterr().out.strip() == "pulled fake-tiny:1b"
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            docker_client.networks.get(network).remove()
    # The running FAKE deployment sees it in its own volume (through the gateway).
    async with gateway.client.get(gateway.url + "/api/tags") as response:
        assert response.status == 200
        tags = await response.json()
    assert "fake-tiny:1b" in [m["name"] for m in tags["models"]]
    assert _specs(gateway)[FAKE].pull_name not in {
        c.name for c in docker_client.containers.list(all=True)
    }


async def test_stopping_one_upstream_leaves_the_other_and_the_monitor_recreates_it(
    gateway: Gateway, docker_client: docker.DockerClient, capsys: pytest.CaptureFixture[str]
) -> None:
    specs = _specs(gateway)
    tiny_id = docker_client.containers.get(specs[TINY].name).id
    old_fake = docker_client.containers.get(specs[FAKE].name).id
    restarts = (await _ready(gateway))["upstream"]["upstreams"][FAKE]["restarts"]
    with _environment(_cli_environment(gateway)):
        assert await asyncio.to_thread(cli, ["upstream", "stop", "--upstream", FAKE]) == 0
    assert capsys.readouterr().out.strip() == f"stopped {specs[FAKE].name}"
    assert docker_client.containers.get(specs[TINY].name).status == "running"
    status, _, reply = await _post(gateway, CHAT, _chat("tiny"))
    assert status == 200, reply
    # The monitor sees the deployment gone and creates it again (new containers).
    async with asyncio.timeout(30):
        while True:
            state = (await _ready(gateway))["upstream"]["upstreams"][FAKE]
            if state["state"] == "ready" and state["restarts"] > restarts:
                break
            await asyncio.sleep(0.1)
    assert docker_client.containers.get(specs[FAKE].name).id != old_fake
    status, _, reply = await _post(gateway, CHAT, _chat("fake-llama"))
    assert status == 200, reply
    assert docker_client.containers.get(specs[TINY].name).id == tiny_id


async def test_a_crash_of_one_fails_only_its_model_and_it_comes_back(
    gateway: Gateway, docker_client: docker.DockerClient
) -> None:
    specs = _specs(gateway)
    fake = docker_client.containers.get(specs[FAKE].name)
    tiny = docker_client.containers.get(specs[TINY].name)
    tiny_relay = docker_client.containers.get(specs[TINY].relay_name)
    fake_started = fake.attrs["State"]["StartedAt"]
    tiny_started = (tiny.attrs["State"]["StartedAt"], tiny_relay.attrs["State"]["StartedAt"])
    restarts_before = (await _ready(gateway))["upstream"]["upstreams"][FAKE]["restarts"]
    await asyncio.to_thread(fake.kill)  # SIGKILL: a crash, not a stop
    refused = None
    async with asyncio.timeout(15):
        while refused is None:
            status, headers, body = await _post(gateway, CHAT, _chat("fake-llama"))
            if status == 503 and headers.get(wire.ERROR_HEADER) == "upstream_down":
                refused = (headers, body)
            await asyncio.sleep(0.02)
    headers, body = refused
    assert headers["Retry-After"] == "2"
    assert body["error"]["code"] == "upstream_down"
    # The other deployment still serves, meanwhile.
    status, _, reply = await _post(gateway, CHAT, _chat("tiny"))
    assert status == 200, reply
    assert reply["choices"][0]["message"]["content"] == TINY_REPLY
    # The monitor restarts the crashed one (its relay with it) and the set is ready again.
    async with asyncio.timeout(30):
        while True:
            ready = await _ready(gateway)
            state = ready["upstream"]["upstreams"][FAKE]
            if state["state"] == "ready":
                break
            assert ready["upstream"]["upstreams"][TINY]["state"] == "ready", ready
            await asyncio.sleep(0.1)
    assert state["restarts"] > restarts_before
    assert state["breaker"]["trips"] >= 1
    assert ready["upstream"]["upstreams"][TINY]["restarts"] == 0
    fake.reload()
    assert fake.status == "running"
    assert fake.attrs["State"]["StartedAt"] != fake_started
    relay = docker_client.containers.get(specs[FAKE].relay_name)
    assert relay.attrs["HostConfig"]["NetworkMode"] == f"container:{fake.id}"
    status, _, reply = await _post(gateway, CHAT, _chat("fake-llama"))
    assert status == 200, reply
    # Recovering one deployment left the other's containers alone.
    tiny.reload()
    tiny_relay.reload()
    after = (tiny.attrs["State"]["StartedAt"], tiny_relay.attrs["State"]["StartedAt"])
    assert after == tiny_started
    assert tiny.id == docker_client.containers.get(specs[TINY].name).id
