"""Named deployments: the store's semantics, files and modes, and the settings they give."""

from __future__ import annotations

import json
import stat
from decimal import Decimal
from pathlib import Path

import pytest

from paygate.config import Settings, load_settings
from paygate.store.deployments import (
    DeploymentExists,
    DeploymentNotFound,
    DeploymentStore,
    InvalidDeployment,
    InvalidDeploymentName,
    build,
    settings_overrides,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_get_list_update_delete(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path / "inference")
    created = store.create(build("beta", price_per_request="0.002", upstream_mode="container"))
    store.create(build("alpha"))
    assert [d.name for d in store.list()] == ["alpha", "beta"]
    got = store.get("beta")
    assert got == created
    assert got.price_per_request == Decimal("0.002")
    path = tmp_path / "inference" / "beta" / "config.json"
    assert _mode(path.parent) == 0o700
    assert _mode(path) == 0o600
    document = json.loads(path.read_text())
    assert document["price_per_request"] == "0.002"  # a decimal string, never a float
    assert document["created_at"].endswith("Z")
    updated = store.update("beta", listen="127.0.0.1:9000")
    assert updated.listen == "127.0.0.1:9000"
    assert updated.created_at == created.created_at
    assert updated.updated_at >= created.updated_at
    assert _mode(path) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]  # no temp files
    store.delete("beta")
    assert [d.name for d in store.list()] == ["alpha"]
    with pytest.raises(DeploymentNotFound):
        store.get("beta")
    with pytest.raises(DeploymentNotFound):
        store.delete("beta")


def test_an_existing_name_is_refused_unless_forced(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path)
    store.create(build("one", listen="127.0.0.1:1"))
    with pytest.raises(DeploymentExists) as refused:
        store.create(build("one"))
    assert refused.value.code == "deployment_exists"
    assert store.create(build("one", listen="127.0.0.1:2"), force=True).listen == "127.0.0.1:2"


@pytest.mark.parametrize(
    "name", ["", "-a", "A", "a_b", "../etc", "a/b", "a;rm", "a b", "$(x)", "x" * 64, ".", "é"]
)
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidDeploymentName) as refused:
        build(name)
    assert refused.value.code == "invalid_deployment_name"
    with pytest.raises(InvalidDeploymentName):
        DeploymentStore(tmp_path).get(name)
    assert list(tmp_path.iterdir()) == []


def test_bad_fields_name_the_field_not_the_value(tmp_path: Path) -> None:
    with pytest.raises(InvalidDeployment, match="price_per_request") as refused:
        build("x", price_per_request="-1")
    assert "-1" not in str(refused.value)
    with pytest.raises(InvalidDeployment, match="wallet_address"):
        build("x", wallet_address="0x123")
    store = DeploymentStore(tmp_path)
    store.create(build("x"))
    with pytest.raises(InvalidDeployment, match="created_at cannot be changed"):
        store.update("x", created_at="1970-01-01T00:00:00Z")
    with pytest.raises(InvalidDeployment, match="unknown"):
        store.update("x", unknown=1)


def test_a_tampered_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    store = DeploymentStore(tmp_path)
    store.create(build("x"))
    (tmp_path / "x" / "config.json").write_text("{not json")
    with pytest.raises(InvalidDeployment, match="not valid"):
        store.get("x")
    (tmp_path / "x" / "config.json").write_text(json.dumps(build("y").document()))
    with pytest.raises(InvalidDeployment, match="names y"):
        store.get("x")


def test_a_deployment_becomes_settings(tmp_path: Path) -> None:
    deployment = build(
        "prod",
        listen="127.0.0.1:9100",
        upstream_mode="container",
        container_image="ollama/ollama:0.5",
        container_memory="8g",
        container_cpus=2,
        container_host_port=11435,
        no_payment_gate=True,
    )
    overrides = settings_overrides(deployment, set(Settings.model_fields))
    settings = load_settings(None, **overrides)
    assert settings.listen == "127.0.0.1:9100"
    assert settings.upstream_mode == "container"
    assert settings.upstream_image == "ollama/ollama:0.5"
    assert settings.upstream_memory == "8g"
    assert settings.upstream_cpus == 2
    assert settings.upstream_name == "paygate-prod"
    assert settings.payment_mode == "off"
    assert "container_host_port" not in overrides
    assert settings_overrides(build("a", listen="127.0.0.1:1"), {"upstream_url"}) == {
        "upstream_url": "http://127.0.0.1:11434"
    }
