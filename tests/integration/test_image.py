"""The repository's Dockerfile, built for real on a local Debian base (no registry here) by the
tests' private dockerd, and run: non-root, healthy by its own HEALTHCHECK, ``paygate serve``
answering in front of the FAKE model server, the product only (no test or demo tooling), and
the TPM backend working against a swtpm on the host's loopback (host network)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from docker.models.containers import Container
from paygate_dev.docker_stack import IMAGE_BASE_PACKAGES, imported_base, product_image
from paygate_dev.wheels import wheelhouse

from paygate.errors import PaygateError
from tests.fixtures.components import free_port
from tests.integration.gateway_support import ThreadedStack

ROOT = Path(__file__).resolve().parents[2]
PAYGATE = str(Path(sys.executable).with_name("paygate"))
UID = 10402  # the image's paygate user
HEALTH = {"interval": 1_000_000_000, "start_period": 1_000_000_000}  # ns; the test is inherited

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def image(docker_client) -> str:
    try:
        base = imported_base(docker_client, IMAGE_BASE_PACKAGES, name="debian-python-venv")
        wheels = wheelhouse(("tpm",))
    except PaygateError as exc:
        pytest.fail(f"could not prepare the base or the wheels: {exc}")
    try:
        return product_image(docker_client, wheels, ROOT / "Dockerfile", base)
    except PaygateError as exc:
        pytest.fail(f"could not build the image: {exc}")
    finally:
        shutil.rmtree(wheels, ignore_errors=True)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    """The container's /var/lib/paygate on the host, owned by the image's user."""
    directory = tmp_path / "state"
    directory.mkdir(mode=0o700)
    os.chown(directory, UID, UID)
    return directory


def run(docker_client, image: str, state: Path, env: dict[str, str], *args: str) -> Container:
    return docker_client.containers.run(
        image,
        list(args) or None,
        name=f"paygate-image-{uuid.uuid4().hex[:8]}",
        detach=True,
        network_mode="host",
        environment=env,
        volumes={str(state): {"bind": "/var/lib/paygate", "mode": "rw"}},
        healthcheck=HEALTH,
        read_only=True,
        tmpfs={"/tmp": ""},
    )


def wait_healthy(container: Container, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        container.reload()
        health = container.attrs["State"].get("Health", {}).get("Status")
        if health == "healthy":
            return
        if container.status == "exited":
            break
        time.sleep(0.5)
    logs = container.logs().decode(errors="replace")[-2000:]
    raise AssertionError(f"not healthy ({container.attrs['State']}): {logs}")


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.remove(force=True)


def test_image_runs_as_non_root_and_ships_the_product_only(docker_client, image) -> None:
    config = docker_client.images.get(image).attrs["Config"]
    assert config["User"] == "paygate"
    assert config["Healthcheck"]["Test"][0] == "CMD"
    assert config["Entrypoint"] == ["paygate"]
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, os;"
        "print(json.dumps({'uid': os.getuid(),"
        " 'dists': sorted(d.metadata['Name'].lower() for d in m.distributions()),"
        " 'dev': [n for n in ('paygate_dev', 'pytest', 'x402', 'hypothesis') if u.find_spec(n)]}))"
    )
    out = docker_client.containers.run(
        image, entrypoint=["python3", "-c", probe], network_mode="none", remove=True
    )
    found = json.loads(out)
    assert found["uid"] == UID
    assert {"paygate", "tpm2-pytss"} <= set(found["dists"])
    assert found["dev"] == []  # no test or demo tooling in the product image


def test_serve_is_healthy_and_answers_in_front_of_the_fake(
    docker_client, image, state, containers, tmp_path
) -> None:
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(state / "key.pem")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for path in state.iterdir():  # key.pem and the receipt key beside it
        os.chown(path, UID, UID)
    port = free_port()
    with ThreadedStack() as fake:
        container = run(
            docker_client,
            image,
            state,
            {"PAYGATE_LISTEN": f"127.0.0.1:{port}", "PAYGATE_UPSTREAM_URL": fake.fake_url},
        )
        containers.append(container)
        wait_healthy(container)
        response = httpx.post(
            f"http://127.0.0.1:{port}/api/generate",
            json={"model": "fake-llama", "prompt": "hi", "stream": False},
            timeout=10,
        )
        assert response.status_code == 200
        assert response.json()["done"] is True
        assert fake.fake.hits["POST /api/generate"] == 1
    code, out = container.exec_run(["sh", "-c", "grep '^Uid:' /proc/1/status"])
    assert code == 0
    assert out.decode().split()[1:3] == [str(UID), str(UID)]
    container.stop(timeout=20)
    container.reload()
    assert container.attrs["State"]["ExitCode"] == 0


def test_tpm_backend_against_a_swtpm_on_the_host(
    docker_client, image, state, containers, swtpm
) -> None:
    env = {
        "PAYGATE_KEY_BACKEND": "tpm",
        "PAYGATE_TPM_TCTI": swtpm.tcti,
        "PAYGATE_TPM_KEY_DIR": "/var/lib/paygate/tpm-key",
    }
    created = docker_client.containers.run(
        image,
        ["keys", "create", "--json"],
        network_mode="host",
        environment=env,
        volumes={str(state): {"bind": "/var/lib/paygate", "mode": "rw"}},
        remove=True,
    )
    public_key = json.loads(created)["pubkey"]
    port = free_port()
    with ThreadedStack() as fake:
        container = run(
            docker_client,
            image,
            state,
            {**env, "PAYGATE_LISTEN": f"127.0.0.1:{port}", "PAYGATE_UPSTREAM_URL": fake.fake_url},
        )
        containers.append(container)
        wait_healthy(container)
        document = httpx.get(f"http://127.0.0.1:{port}/v1/enclave/pubkey", timeout=5).json()
        # Ready means a real ECDH ran in the TPM through the image's TSS libraries.
        ready = httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).json()
    assert document["backend"] == "tpm"
    assert document["pubkey"] == public_key
    assert ready["checks"]["key"] == "ok"
