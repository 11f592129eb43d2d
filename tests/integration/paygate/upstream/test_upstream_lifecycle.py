"""Container lifecycle on a real Docker engine: stale replacement, refusal, and model pulls."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from pathlib import Path

import aiohttp
import docker
import docker.errors
import pytest
from paygate_dev.docker_stack import Dockerd

from paygate.cli.main import main as cli
from paygate.upstream.container import ContainerManager
from paygate.upstream.engines.base import ModelDigest
from paygate.upstream.errors import ContainerFailed
from paygate.upstream.readiness import wait_ready
from paygate.upstream.service import served_digests
from paygate.upstream.spec import container_spec
from tests.fixtures.docker import DockerImages
from tests.fixtures.upstream_support import container_settings


def _tags(socket: Path) -> list[str]:
    async def fetch() -> list[str]:
        connector = aiohttp.UnixConnector(path=str(socket))
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, "http://localhost:11434/api/version", deadline=30)
            async with session.get("http://localhost:11434/api/tags") as resp:
                return [m["name"] for m in (await resp.json())["models"]]

    return asyncio.run(fetch())


def test_a_stale_container_of_the_same_name_is_replaced(
    dockerd: Dockerd, test_images: DockerImages, docker_client: docker.DockerClient
) -> None:
    settings = container_settings(dockerd, test_images)
    spec = container_spec(settings.upstream())
    first = ContainerManager(docker_client, spec)
    first.start()
    old = {docker_client.containers.get(n).id for n in (spec.name, spec.relay_name)}
    # The gateway died without stopping them; the next one starts over the leftovers.
    second = ContainerManager(docker_client, spec)
    try:
        second.start()
        new = {docker_client.containers.get(n).id for n in (spec.name, spec.relay_name)}
        assert not old & new
        for container_id in old:
            with pytest.raises(docker.errors.NotFound):
                docker_client.containers.get(container_id)
        assert "fake-llama:latest" in _tags(spec.socket_path)
        assert second.ensure_running() == "running"
    finally:
        second.stop()
    docker_client.volumes.get(settings.upstream_volume).remove()
    shutil.rmtree(settings.upstream_socket_dir)


def test_a_container_paygate_did_not_make_is_left_alone(
    dockerd: Dockerd, test_images: DockerImages, docker_client: docker.DockerClient
) -> None:
    settings = container_settings(dockerd, test_images)
    spec = container_spec(settings.upstream())
    foreign = docker_client.containers.run(
        test_images.busybox, ["sleep", "60"], name=spec.name, detach=True, network_mode="none"
    )
    try:
        with pytest.raises(ContainerFailed, match="paygate did not create it") as failed:
            ContainerManager(docker_client, spec).start()
        assert failed.value.code == "container_failed"
        foreign.reload()
        assert foreign.status == "running"
    finally:
        foreign.remove(force=True)
        shutil.rmtree(settings.upstream_socket_dir)


def test_pull_writes_into_the_volume_through_a_short_lived_container(
    dockerd: Dockerd,
    test_images: DockerImages,
    docker_client: docker.DockerClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = container_settings(dockerd, test_images, upstream_pull_network="pgtest-pull")
    spec = container_spec(settings.upstream())
    for name, value in {
        "PAYGATE_UPSTREAM_MODE": "container",
        "PAYGATE_DOCKER_HOST": dockerd.host,
        "PAYGATE_UPSTREAM_NAME": spec.name,
        "PAYGATE_UPSTREAM_IMAGE": settings.upstream_image,
        "PAYGATE_UPSTREAM_VOLUME": settings.upstream_volume,
        "PAYGATE_UPSTREAM_SOCKET_DIR": str(settings.upstream_socket_dir),
        "PAYGATE_UPSTREAM_PULL_NETWORK": "pgtest-pull",
    }.items():
        monkeypatch.setenv(name, value)
    assert cli(["upstream", "pull", "fake-tiny:1b"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == "pulled fake-tiny:1b"
    assert "pulling manifest" in err
    assert "100%" in err
    assert err.strip().endswith("success")
    names = {c.name for c in docker_client.containers.list(all=True)}
    assert spec.pull_name not in names  # removed after the pull
    # A serving container (no network) sees the model in the shared volume.
    manager = ContainerManager(docker_client, spec)
    manager.start()
    try:
        assert "fake-tiny:1b" in _tags(spec.socket_path)
        # The weights' digest: the manifest's model layer, read from the volume.
        layer = "sha256:" + hashlib.sha256(b"fake-tiny:1b").hexdigest()
        assert ModelDigest("fake-tiny:1b", layer) in served_digests(settings.upstream(), manager)
    finally:
        manager.stop()
    docker_client.volumes.get(settings.upstream_volume).remove()
    docker_client.networks.get("pgtest-pull").remove()
    shutil.rmtree(settings.upstream_socket_dir)


def test_pull_errors_are_one_line_with_a_code(
    dockerd: Dockerd,
    test_images: DockerImages,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAYGATE_UPSTREAM_MODE", "attach")
    assert cli(["upstream", "pull", "anything"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error [upstream_error]: upstream pull needs upstream_mode = container"
    )
    monkeypatch.setenv("PAYGATE_UPSTREAM_MODE", "container")
    monkeypatch.setenv("PAYGATE_DOCKER_HOST", "unix:///nonexistent/docker.sock")
    assert cli(["upstream", "pull", "anything"]) == 2
    assert capsys.readouterr().err.startswith("error [docker_unavailable]: cannot reach")
