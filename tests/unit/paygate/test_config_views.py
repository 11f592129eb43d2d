"""The typed views built from the settings by name (``settings_view``): every field is the
setting it says, so renaming either side fails here rather than silently taking a default."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from pathlib import Path

import pytest

from paygate.config import ConfigError, Settings, load_settings
from paygate.server.admission import AdmissionLimits
from paygate.server.app import admission_limits
from paygate.upstream.config import UpstreamConfig

DIGEST = "sha256:" + "ab" * 32
UPSTREAM = {
    "upstream_mode": "container",
    "upstream_kind": "vllm",
    "upstream_url": "http://127.0.0.1:9001",
    "upstream_health_path": "/ready",
    "upstream_monitor": False,
    "upstream_health_interval": 7.0,
    "upstream_failure_threshold": 9,
    "upstream_ready_timeout": 11.0,
    "ready_probe_timeout": 3.5,
    "upstream_restart_backoff_max": 13.0,
    "retry_after_seconds": 4,
    "docker_host": "unix:///run/other.sock",
    "upstream_name": "named",
    "upstream_image": "img/x:1",
    "upstream_relay_image": "relay/y:2",
    "upstream_volume": "vol-z",
    "upstream_models_dir": "/weights",
    "upstream_port": 9100,
    "upstream_cpus": 2.5,
    "upstream_memory": "2g",
    "upstream_pids_limit": 99,
    "upstream_gpus": "all",
    "upstream_tmpfs": {"/scratch": "rw,size=1m"},
    "upstream_socket_dir": Path("/run/elsewhere"),
    "upstream_pull_network": "pull-net",
    "upstream_pull_timeout": 60.0,
    "upstream_model_path": Path("/srv/m.gguf"),
    "upstream_model_name": "m",
    "expected_model_digests": {"m": DIGEST},
}


def test_every_upstream_field_is_its_setting() -> None:
    settings = Settings(**UPSTREAM)
    view = settings.upstream()
    seen = {}
    for field in dataclasses.fields(UpstreamConfig):
        if field.name in ("api_key", "previous_name"):  # resolved; a set member's own
            continue
        name = next(n for n in (f"upstream_{field.name}", field.name) if n in UPSTREAM)
        seen[name] = getattr(view, field.name)
    assert seen == UPSTREAM  # each setting reached its field, none was left at a default


def test_the_upstream_view_shares_no_dict_with_the_settings() -> None:
    settings = Settings(**UPSTREAM)
    view = settings.upstream()
    view.tmpfs["/extra"] = "rw"  # type: ignore[index]
    view.expected_model_digests["other"] = DIGEST  # type: ignore[index]
    assert settings.upstream_tmpfs == {"/scratch": "rw,size=1m"}
    assert settings.expected_model_digests == {"m": DIGEST}


def test_the_upstream_key_is_only_for_an_attached_server(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("s3cret\n")
    attached = Settings(upstream_api_key_file=key, upstream_url="https://models.example")
    assert attached.upstream().api_key is not None
    assert attached.upstream().api_key.get_secret_value() == "s3cret"  # type: ignore[union-attr]
    contained = Settings(upstream_api_key_file=key, upstream_mode="container")
    assert contained.upstream().api_key is None


def test_every_admission_limit_is_its_setting() -> None:
    settings = Settings(
        max_body_bytes=12345,
        body_read_timeout=3.0,
        body_first_byte_timeout=2.0,
        body_slots=40,
        unpaid_body_slots=8,
        per_ip_body_slots=3,
        unpaid_open_slots=7,
        per_ip_open_slots=2,
        unpaid_opens_per_second=5.5,
        claimed_opens_per_second=33.0,
        require_encryption=True,
        retry_after_seconds=6,
        trusted_proxies=["10.0.0.0/8"],
        ipv6_prefix_length=48,
    )
    limits = admission_limits(settings)
    assert limits == AdmissionLimits(
        max_body_bytes=12345,
        body_read_timeout=3.0,
        body_first_byte_timeout=2.0,
        body_slots=40,
        unpaid_body_slots=8,
        per_ip_body_slots=3,
        unpaid_open_slots=7,
        per_ip_open_slots=2,
        unpaid_opens_per_second=5.5,
        claimed_opens_per_second=33.0,
        require_encryption=True,
        retry_after_seconds=6,
        trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),),
        ipv6_prefix=48,
    )


@pytest.mark.parametrize(
    ("name", "value", "error"),
    [
        ("alert_webhook", "http://hooks.example/t0ken", "https:// (http:// only on loopback)"),
        ("alert_webhook", "ftp://hooks.example/t0ken", "an http:// or https:// URL"),
        ("alert_webhook", "hooks.example/t0ken", "an http:// or https:// URL"),
        ("ledger_url", "mysql://u:t0ken@db/x", "ledger URL must start with"),
    ],
)
def test_a_bad_secret_url_is_refused_without_quoting_it(name: str, value: str, error: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(error)) as refused:
        load_settings(None, **{name: value})
    assert "t0ken" not in str(refused.value)


def test_secret_urls_are_kept_hidden_and_empty_is_unset() -> None:
    settings = load_settings(
        None, alert_webhook="http://127.0.0.1:9/t0ken", ledger_url="sqlite:////tmp/x.db"
    )
    assert "t0ken" not in repr(settings.alert_webhook)
    assert settings.alert_webhook.get_secret_value() == "http://127.0.0.1:9/t0ken"  # type: ignore[union-attr]
    assert settings.ledger_url.get_secret_value() == "sqlite:////tmp/x.db"  # type: ignore[union-attr]
    empty = load_settings(None, alert_webhook="", ledger_url="")
    assert empty.alert_webhook is None
    assert empty.ledger_url is None
