"""A set's container deployments are named within the gateway's ``upstream_name``, on the
session's real dockerd (the FAKE model server in Ollama's place).

- two gateways on one engine whose sets have a same-named upstream each keep their own
  deployment: starting the second leaves the first's container running, untouched, serving;
- a deployment made under the name before (``paygate-<upstream>``) is adopted at start: its
  containers replaced (none left behind, none doubled), its model volume kept in use;
- but not one of that name that another gateway without ``upstream_name`` runs now (that is
  its name still): its containers keep serving, its volume stays its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from paygate_dev.docker_stack import Dockerd

from paygate.config import Settings
from paygate.upstream.container import ContainerManager
from paygate.upstream.spec import ContainerSpec, container_spec
from tests.fixtures.docker import DockerImages
from tests.fixtures.upstream_support import Gateway, container_settings, running_gateway

CHAT = "/v1/chat/completions"


def _settings(dockerd: Dockerd, images: DockerImages, member: str, **more: Any) -> Settings:
    upstreams = [{"name": member, "kind": "ollama", "mode": "container", "models": ["fake-llama"]}]
    return container_settings(dockerd, images, upstreams=upstreams, **more)


def _spec(settings: Settings) -> ContainerSpec:
    (entry,) = settings.upstream_entries()
    return container_spec(entry.config)


async def _chat(gw: Gateway) -> int:
    body: dict[str, Any] = {"model": "fake-llama", "messages": [{"role": "user", "content": "hi"}]}
    async with gw.client.post(gw.url + CHAT, json=body) as response:
        await response.read()
        return response.status


def _id(client: docker.DockerClient, name: str) -> str:
    container = client.containers.get(name)
    assert container.status == "running"
    return str(container.id)


@contextlib.contextmanager
def _removed_after(
    client: docker.DockerClient, names: list[str], volumes: list[str]
) -> Iterator[None]:
    """Whatever happens: none of these containers and volumes survives the test."""
    try:
        yield
    finally:
        for name in names:
            with contextlib.suppress(docker.errors.NotFound):
                client.containers.get(name).remove(force=True)
        for volume in volumes:
            with contextlib.suppress(docker.errors.NotFound):
                client.volumes.get(volume).remove(force=True)


def _everything(spec: ContainerSpec) -> list[str]:
    return [spec.name, spec.relay_name, spec.pull_name]


async def test_two_gateways_with_same_named_upstreams_keep_their_own_deployments(
    dockerd: Dockerd, test_images: DockerImages, docker_client: docker.DockerClient
) -> None:
    member = f"t{secrets.token_hex(3)}"
    first, second = (_settings(dockerd, test_images, member) for _ in range(2))
    specs = [_spec(first), _spec(second)]
    assert specs[0].name != specs[1].name
    assert first.upstream_name is not None
    assert specs[0].name.startswith(first.upstream_name)
    every = [name for spec in specs for name in _everything(spec)]
    with _removed_after(docker_client, every, [s.volume for s in specs]):
        async with running_gateway(first) as a:
            assert await _chat(a) == 200
            before = _id(docker_client, specs[0].name)
            async with running_gateway(second) as b:
                assert await _chat(b) == 200
                assert await _chat(a) == 200
                assert _id(docker_client, specs[0].name) == before  # never replaced
                assert _id(docker_client, specs[1].name) != before


async def test_a_deployment_under_its_name_before_is_adopted(
    dockerd: Dockerd, test_images: DockerImages, docker_client: docker.DockerClient
) -> None:
    member = f"t{secrets.token_hex(3)}"
    settings = _settings(dockerd, test_images, member)
    spec = _spec(settings)
    assert spec.previous == f"paygate-{member}"
    # What the gateway made before names included upstream_name: paygate-<member>, its volume.
    (entry,) = settings.upstream_entries()
    old = dataclasses.replace(
        container_spec(entry.config, name=spec.previous),
        previous=None,
        previous_volume=None,
        marked=False,  # an earlier version did not mark what it made
    )
    assert old.volume == spec.previous_volume
    names = _everything(spec) + _everything(old)
    with _removed_after(docker_client, names, [spec.volume, old.volume]):
        await asyncio.to_thread(ContainerManager(docker_client, old).start)
        _id(docker_client, old.name)
        async with running_gateway(settings) as gw:
            assert await _chat(gw) == 200
            ours = [
                c.name
                for c in docker_client.containers.list(all=True)
                if c.name in {*_everything(spec), *_everything(old)}
            ]
            assert sorted(ours) == sorted([spec.name, spec.relay_name])  # none left, none twice
            serving = docker_client.containers.get(spec.name)
            volumes = [m["Name"] for m in serving.attrs["Mounts"] if m["Type"] == "volume"]
            assert volumes == [old.volume]  # the models it had
        with pytest.raises(docker.errors.NotFound):
            docker_client.volumes.get(spec.volume)  # never made: nothing doubled
        docker_client.volumes.get(old.volume)  # kept across the stop, as always


async def test_another_gateways_current_deployment_under_the_name_before_is_not_adopted(
    dockerd: Dockerd, test_images: DockerImages, docker_client: docker.DockerClient
) -> None:
    member = f"t{secrets.token_hex(3)}"
    plain = _settings(dockerd, test_images, member, upstream_name=None)  # paygate-<member>
    named = _settings(dockerd, test_images, member)
    specs = [_spec(plain), _spec(named)]
    assert specs[0].name == specs[1].previous == f"paygate-{member}"
    every = [name for spec in specs for name in _everything(spec)]
    with _removed_after(docker_client, every, [s.volume for s in specs]):
        async with running_gateway(plain) as a:
            assert await _chat(a) == 200
            before = _id(docker_client, specs[0].name)
            async with running_gateway(named) as b:
                assert await _chat(b) == 200
                assert await _chat(a) == 200
                assert _id(docker_client, specs[0].name) == before  # never replaced
                serving = docker_client.containers.get(specs[1].name)
                volumes = [m["Name"] for m in serving.attrs["Mounts"] if m["Type"] == "volume"]
                assert volumes == [specs[1].volume]  # its own, not the other's models
