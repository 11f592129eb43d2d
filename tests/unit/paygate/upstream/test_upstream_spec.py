"""Container names, the container specs (docker keyword arguments), the breaker, the monitor."""

from __future__ import annotations

from pathlib import Path

import pytest

from paygate.config import ConfigError, load_settings
from paygate.upstream.breaker import CircuitBreaker
from paygate.upstream.errors import InvalidName
from paygate.upstream.monitor import HealthMonitor
from paygate.upstream.names import container_name, derived_name
from paygate.upstream.readiness import ProbeResult
from paygate.upstream.spec import (
    container_spec,
    gpu_request,
    pull_kwargs,
    relay_kwargs,
    serving_kwargs,
)


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("Paygate_Ollama", "paygate-ollama"),
        ("  my model/server:latest ", "my-model-server-latest"),
        ("--a..b--", "a-b"),
        ("x" * 80, "x" * 63),
        ("a" * 62 + "-b", "a" * 62),
        ("../../etc;rm -rf", "etc-rm-rf"),
    ],
)
def test_container_names_are_sanitized_like_the_reference(raw: str, name: str) -> None:
    assert container_name(raw) == name


@pytest.mark.parametrize("raw", ["", "---", "!!!", "/"])
def test_a_name_with_nothing_usable_is_refused(raw: str) -> None:
    with pytest.raises(InvalidName) as refused:
        container_name(raw)
    assert refused.value.code == "invalid_name"


def test_derived_names_keep_their_suffix_within_63() -> None:
    assert derived_name("x" * 70, "relay") == "x" * 57 + "-relay"
    assert len(derived_name("x" * 70, "relay")) == 63


def _settings(tmp_path: Path, **overrides: object) -> object:
    return load_settings(
        None,
        upstream_mode="container",
        upstream_socket_dir=tmp_path,
        upstream_cpus=1.5,
        upstream_memory="2G",
        upstream_pids_limit=100,
        **overrides,
    )


def test_the_serving_container_has_no_network_and_every_limit(tmp_path: Path) -> None:
    spec = container_spec(_settings(tmp_path).upstream())
    kwargs = serving_kwargs(spec)
    assert kwargs["name"] == "paygate-ollama"
    assert kwargs["image"] == "ollama/ollama"
    assert kwargs["network_mode"] == "none"
    assert "ports" not in kwargs
    assert "network" not in kwargs
    assert kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"]
    assert "cap_add" not in kwargs
    assert kwargs["security_opt"] == ["no-new-privileges:true"]
    assert kwargs["nano_cpus"] == 1_500_000_000
    assert kwargs["mem_limit"] == kwargs["memswap_limit"] == "2g"
    assert kwargs["pids_limit"] == 100
    assert kwargs["tmpfs"] == {"/tmp": "rw,nosuid,nodev,noexec,size=512m"}
    assert kwargs["environment"]["OLLAMA_HOST"] == "127.0.0.1:11434"
    assert kwargs["environment"]["OLLAMA_MODELS"] == "/root/.ollama/models"
    (mount,) = kwargs["mounts"]
    assert (mount["Target"], mount["Source"], mount["Type"]) == (
        "/root/.ollama",
        "paygate-ollama-models",
        "volume",
    )
    assert kwargs["restart_policy"] == {"Name": "no"}
    assert "device_requests" not in kwargs


def test_gpus_become_device_requests(tmp_path: Path) -> None:
    assert serving_kwargs(container_spec(_settings(tmp_path, upstream_gpus="all").upstream()))[
        "device_requests"
    ] == [gpu_request("all")]
    assert gpu_request("all")["Count"] == -1
    assert gpu_request("0, 2")["DeviceIDs"] == ["0", "2"]
    assert gpu_request("0,2")["Capabilities"] == [["gpu"]]


def test_the_relay_joins_the_serving_namespace_as_the_gateway_user(tmp_path: Path) -> None:
    spec = container_spec(_settings(tmp_path).upstream())
    kwargs = relay_kwargs(spec, "abc123")
    assert kwargs["network_mode"] == "container:abc123"
    assert kwargs["name"] == "paygate-ollama-relay"
    assert kwargs["user"] == spec.user
    assert kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"]
    sources = {m["Target"]: (m["Source"], m["ReadOnly"]) for m in kwargs["mounts"]}
    assert sources["/run/paygate"] == (str(tmp_path / "paygate-ollama"), False)
    assert sources["/opt/paygate-relay/relay.py"] == (str(spec.relay_script), True)
    assert spec.socket_path == tmp_path / "paygate-ollama" / "upstream.sock"


def test_only_the_pull_container_has_a_network_and_it_publishes_on_loopback(
    tmp_path: Path,
) -> None:
    kwargs = pull_kwargs(container_spec(_settings(tmp_path).upstream()))
    assert kwargs["network"] == "paygate-pull"
    assert kwargs["ports"] == {"11434/tcp": ("127.0.0.1", None)}
    assert kwargs["name"] == "paygate-ollama-pull"
    assert kwargs["read_only"] is True
    assert kwargs["cap_drop"] == ["ALL"]


def test_a_socket_path_too_long_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidName, match="too long"):
        container_spec(_settings(tmp_path / ("d" * 100)).upstream())


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("upstream_memory", "lots"),
        ("upstream_gpus", "all; rm"),
        ("upstream_health_path", "health"),
        ("upstream_image", "bad image"),
        ("upstream_tmpfs", {"tmp": "rw"}),
        ("upstream_mode", "vm"),
        ("discover_ports", "80,99999"),
    ],
)
def test_bad_upstream_settings_name_the_setting(setting: str, value: object) -> None:
    with pytest.raises(ConfigError, match=setting):
        load_settings(None, **{setting: value})


def test_discover_ports_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYGATE_DISCOVER_PORTS", "9000, 9001")
    assert load_settings(None).discover_ports == [9000, 9001]


def test_the_breaker_opens_after_the_threshold_and_closes_on_success() -> None:
    breaker = CircuitBreaker(threshold=2, retry_after=5)
    breaker.record_failure("connection refused")
    assert breaker.allows()
    breaker.record_failure("connection refused")
    assert not breaker.allows()
    assert breaker.snapshot() == {
        "state": "open",
        "consecutive_failures": 2,
        "reason": "connection refused",
        "trips": 1,
    }
    breaker.record_success()
    assert breaker.allows()
    breaker.trip("container not running")
    assert breaker.snapshot()["trips"] == 2


async def test_the_monitor_restarts_a_crashed_container_with_growing_backoff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    monkeypatch.setattr("paygate.upstream.monitor.asyncio.sleep", sleep)
    crashed = [True, True, False]
    recovered: list[str] = []

    async def is_crashed() -> bool:
        return crashed.pop(0)

    async def recover() -> str:
        recovered.append("restarted")
        return "restarted"

    async def check() -> ProbeResult:
        return ProbeResult(ok=True, reachable=True, detail="http 200")

    breaker = CircuitBreaker(threshold=3)
    monitor = HealthMonitor(
        check=check,
        breaker=breaker,
        interval=5.0,
        backoff_max=0.8,
        crashed=is_crashed,
        recover=recover,
    )
    await monitor.step()
    assert breaker.is_open
    assert monitor.current_state() == "restarting"
    await monitor.step()
    await monitor.step()
    assert slept == [0.5, 0.8]  # doubled, capped at backoff_max
    assert recovered == ["restarted", "restarted"]
    assert monitor.restarts == 2
    assert monitor.current_state() == "ready"
    assert not breaker.is_open
