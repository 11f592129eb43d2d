"""The repository's Dockerfile, built for real on a local Debian base (no registry here) by the
tests' private dockerd, and run: non-root, healthy by its own HEALTHCHECK, ``paygate serve``
answering in front of the FAKE model server, the product only (no test or demo tooling), the
TPM backend working against a swtpm on the host's loopback, and the PostgreSQL ledger: a paid
request through the image recorded in the tests' PostgreSQL. The containers use the host network,
which is how they reach the host's loopback services (swtpm, PostgreSQL, the facilitator)."""

from __future__ import annotations

import base64
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

from paygate import wire
from paygate.errors import PaygateError
from paygate.x402.ledger import PaymentState
from paygate.x402.ledger_store import open_ledger, parse_ledger_url
from tests.fixtures.chain import encode_header, sign_v2_payment
from tests.fixtures.components import free_port
from tests.fixtures.gateway_support import ThreadedStack
from tests.fixtures.payment_support import CHAT, CHAT_BODY, PRICE_ATOMIC

ROOT = Path(__file__).resolve().parents[2]
PAYGATE = str(Path(sys.executable).with_name("paygate"))
UID = 10402  # the image's paygate user
HEALTH = {"interval": 1_000_000_000, "start_period": 1_000_000_000}  # ns; the test is inherited
EXTRAS = ("tpm", "pkcs11", "postgres")  # what the Dockerfile installs

pytestmark = pytest.mark.timeout(1200)


@pytest.fixture(scope="module")
def image(docker_client) -> str:
    try:
        base = imported_base(docker_client, IMAGE_BASE_PACKAGES, name="debian-python-venv")
        wheels = wheelhouse(EXTRAS)
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


def make_key(state: Path) -> None:
    """A software key in the state directory, owned by the image's user."""
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(state / "key.pem")],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    for path in state.iterdir():  # key.pem and the receipt key beside it
        os.chown(path, UID, UID)


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
    # the hardware key bindings and the PostgreSQL ledger's driver (with its libpq)
    assert {"paygate", "tpm2-pytss", "python-pkcs11", "psycopg", "psycopg-binary"} <= set(
        found["dists"]
    )
    assert {"psycopg-pool"} <= set(found["dists"])
    assert found["dev"] == []  # no test or demo tooling in the product image


def test_serve_is_healthy_and_answers_in_front_of_the_fake(
    docker_client, image, state, containers, tmp_path
) -> None:
    make_key(state)
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


async def test_serve_records_a_paid_request_in_a_postgresql_ledger(
    docker_client, image, state, containers, pg_url, facilitator, usdc, payer, seller
) -> None:
    port = free_port()
    env = {
        "PAYGATE_LISTEN": f"127.0.0.1:{port}",
        "PAYGATE_PAYMENT_MODE": "facilitator",
        "PAYGATE_PAY_TO": seller,
        "PAYGATE_NETWORK": "base-sepolia",
        "PAYGATE_FACILITATOR_URL": facilitator.url,
        "PAYGATE_LEDGER_URL": pg_url,
    }
    make_key(state)
    url = f"http://127.0.0.1:{port}{CHAT}"
    with ThreadedStack() as fake:
        env["PAYGATE_UPSTREAM_URL"] = fake.fake_url
        container = run(docker_client, image, state, env)
        containers.append(container)
        wait_healthy(container)
        async with httpx.AsyncClient(timeout=30) as client:
            challenge = await client.post(url, json=CHAT_BODY)
            assert challenge.status_code == 402, challenge.text
            required = json.loads(base64.b64decode(challenge.headers[wire.PAYMENT_REQUIRED]))
            payment = sign_v2_payment(
                payer, required["accepts"][0], resource=required["resource"]["url"]
            )
            paid = await client.post(
                url, json=CHAT_BODY, headers={wire.PAYMENT_SIGNATURE: encode_header(payment)}
            )
        assert paid.status_code == 200, paid.text
        assert fake.fake.hits["POST /v1/chat/completions"] == 1
    container.stop(timeout=20)
    assert not (state / "payments.db").exists()  # not the image's default SQLite file
    ledger = await open_ledger(parse_ledger_url(pg_url), read_only=True)
    try:
        (record,) = await ledger.list(limit=10)
    finally:
        await ledger.close()
    assert record.state is PaymentState.SETTLED
    assert record.amount == PRICE_ATOMIC
    assert usdc.balance_of(seller) == PRICE_ATOMIC
