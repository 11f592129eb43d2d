"""Header hygiene, forwarded addresses, error shapes, limits, metrics, settings and payment mode."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from paygate.config import ConfigError, load_settings, split_listen
from paygate.server.assembly import check_payment_settings
from paygate.server.errors import (
    DecryptionFailed,
    Overloaded,
    UpstreamTimeout,
    api_style_for_path,
    error_body,
)
from paygate.server.forwarded import client_address, parse_networks
from paygate.server.limits import ConcurrencyLimiter
from paygate.server.metrics import Metrics
from paygate.server.proxy import relayed_response_headers, upstream_request_headers


def test_upstream_request_headers_are_an_allowlist() -> None:
    caller = CIMultiDict(
        {
            "Accept": "application/json",
            "User-Agent": "ua",
            "Authorization": "Bearer x",
            "Cookie": "a=b",
            "X-Obol-Reply-Pubkey": "04",
            "X-Forwarded-For": "6.6.6.6",
            "Host": "gw",
            "Connection": "x-a",
            "X-A": "1",
            "Payment-Signature": "sig",
        }
    )
    out = upstream_request_headers(caller, client_address="10.0.0.9", scheme="http")
    assert dict(out) == {
        "Accept": "application/json",
        "User-Agent": "ua",
        "Accept-Encoding": "identity",
        "X-Forwarded-For": "10.0.0.9",
        "X-Forwarded-Proto": "http",
    }


def test_relayed_response_headers_drop_the_dangerous_ones() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "10"),
            ("Content-Encoding", "gzip"),
            ("Transfer-Encoding", "chunked"),
            ("Connection", "keep-alive, X-Hop"),
            ("X-Hop", "1"),
            ("Set-Cookie", "a=b"),
            ("Payment-Response", "x"),
            ("PAYMENT-REQUIRED", "x"),
            ("X-Payment-Response", "x"),
            ("Settlement-Overrides", "x"),
            ("X-Paygate-Overhead-Ms", "0"),
            ("X-Request-Id", "keep"),
        ]
    )
    assert dict(relayed_response_headers(upstream)) == {
        "Content-Type": "application/json",
        "X-Request-Id": "keep",
    }


def test_client_address() -> None:
    none = parse_networks([])
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_address("1.1.1.1", ["2.2.2.2"], none) == "1.1.1.1"
    assert client_address("1.1.1.1", ["2.2.2.2"], trusted) == "1.1.1.1"  # peer not trusted
    assert client_address("10.0.0.1", ["9.9.9.9, 2.2.2.2"], trusted) == "2.2.2.2"
    assert client_address("10.0.0.1", ["2.2.2.2, 10.0.0.5"], trusted) == "2.2.2.2"
    assert client_address("10.0.0.1", ["garbage"], trusted) == "10.0.0.1"
    assert client_address("10.0.0.1", [], trusted) == "10.0.0.1"


def test_error_shapes() -> None:
    assert api_style_for_path("/api/chat") == "ollama"
    assert api_style_for_path("/v1/x") == "openai"
    assert api_style_for_path("/health") == "free"
    assert error_body(DecryptionFailed(), "ollama") == {"error": "decryption failed"}
    assert error_body(UpstreamTimeout("idle"), "openai") == {
        "error": {
            "message": "the model server timed out (idle timeout)",
            "type": "server_error",
            "code": "upstream_timeout",
        }
    }


def test_concurrency_limiter() -> None:
    limiter = ConcurrencyLimiter(1, retry_after=2)
    with limiter.slot():
        assert limiter.in_flight == 1
        with pytest.raises(Overloaded) as info, limiter.slot():
            pass
        assert info.value.headers == {"Retry-After": "2"}
    assert limiter.in_flight == 0


def test_metrics_render() -> None:
    metrics = Metrics()
    metrics.observe("POST /api/chat", 200)
    metrics.error("overloaded")
    metrics.envelope(2)
    text = metrics.render(in_flight=3).decode()
    assert 'paygate_requests_total{route="POST /api/chat",status="200"} 1.0' in text
    assert 'paygate_errors_total{code="overloaded"} 1.0' in text
    assert 'paygate_request_envelopes_total{envelope="v2"} 1.0' in text
    assert "paygate_in_flight 3.0" in text


def test_gateway_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYGATE_LISTEN", "192.0.2.1:9000")
    monkeypatch.setenv("PAYGATE_UPSTREAM_URL", "http://ollama:11434/")
    monkeypatch.setenv("PAYGATE_MAX_BODY_BYTES", "2048")
    monkeypatch.setenv("PAYGATE_TRUSTED_PROXIES", "10.0.0.1, 10.1.0.0/16")
    monkeypatch.setenv("PAYGATE_REQUIRE_ENCRYPTION", "true")
    settings = load_settings()
    assert (settings.listen_host, settings.listen_port) == ("192.0.2.1", 9000)
    assert settings.upstream_url == "http://ollama:11434"
    assert settings.max_body_bytes == 2048
    assert settings.trusted_proxies == ["10.0.0.1", "10.1.0.0/16"]
    assert settings.require_encryption is True


def test_gateway_setting_defaults() -> None:
    settings = load_settings()
    assert settings.listen == "127.0.0.1:8402"
    assert settings.upstream_url == "http://127.0.0.1:11434"
    assert settings.payment_mode == "off"


@pytest.mark.parametrize(
    "overrides",
    [
        {"listen": "8402"},
        {"listen": "host:99999"},
        {"upstream_url": "ftp://x"},
        {"upstream_url": "http://u:p@x"},
        {"max_body_bytes": 0},
        {"idle_timeout": -1},
        {"trusted_proxies": ["not-an-ip"]},
        {"payment_mode": "free"},
    ],
)
def test_bad_gateway_settings(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        load_settings(**overrides)


def test_split_listen_ipv6() -> None:
    assert split_listen("[::1]:8402") == ("::1", 8402)


PAY_TO = "0x" + "ab" * 20


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"payment_mode": "facilitator"}, "pay_to"),
        ({"payment_mode": "facilitator", "pay_to": PAY_TO}, "facilitator_url"),
        ({"payment_mode": "verify-only", "pay_to": PAY_TO}, "facilitator_url"),
        ({"payment_mode": "chain", "pay_to": PAY_TO}, "chain_rpc_url"),
        (
            {"payment_mode": "chain", "pay_to": PAY_TO, "chain_rpc_url": "http://127.0.0.1:8545"},
            "gas_key",
        ),
        (
            {
                "payment_mode": "facilitator",
                "pay_to": PAY_TO,
                "facilitator_url": "https://f.example",
                "network": "eip155:999999",
            },
            "asset_address",
        ),
        (
            {
                "payment_mode": "facilitator",
                "pay_to": PAY_TO,
                "facilitator_url": "https://f.example",
                "network": "nope",
            },
            "unknown network",
        ),
        # Batching is the gateway's own gas account's: in any other mode the knob does nothing.
        (
            {
                "payment_mode": "facilitator",
                "pay_to": PAY_TO,
                "facilitator_url": "https://f.example",
                "chain_batch_max": 10,
            },
            "chain_batch_max",
        ),
        ({"payment_mode": "off", "chain_batch_max": 2}, "chain_batch_max"),
    ],
)
def test_payment_modes_refuse_to_start_incomplete(overrides: dict[str, object], match: str) -> None:
    # An operator who asked for payments never gets a free gateway by accident.
    with pytest.raises(ConfigError, match=match):
        check_payment_settings(load_settings(**overrides))


def test_payment_settings_checks() -> None:
    check_payment_settings(load_settings(payment_mode="off"))
    check_payment_settings(
        load_settings(
            payment_mode="facilitator", pay_to=PAY_TO, facilitator_url="http://127.0.0.1:9"
        )
    )
    with pytest.raises(ConfigError, match="https"):
        load_settings(facilitator_url="http://facilitator.example")
    with pytest.raises(ConfigError, match="custom asset"):
        load_settings(asset_address=PAY_TO)


@pytest.mark.parametrize(
    "overrides",
    [
        {"chain_batch_max": 0},
        {"chain_batch_max": -1},
        {"chain_batch_max": 201},
        {"chain_batch_window_ms": -1},
        {"chain_batch_window_ms": 10_001},
    ],
)
def test_chain_batch_settings_are_bounded(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="chain_batch"):
        load_settings(**overrides)


def test_chain_batch_settings_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("PAYGATE_CHAIN_BATCH_MAX", "25")
    monkeypatch.setenv("PAYGATE_CHAIN_BATCH_WINDOW_MS", "0")
    settings = load_settings(
        payment_mode="chain",
        pay_to=PAY_TO,
        chain_rpc_url="http://127.0.0.1:8545",
        gas_key="0x" + "11" * 32,
    )
    assert (settings.chain_batch_max, settings.chain_batch_window_ms) == (25, 0)
    check_payment_settings(settings)
    monkeypatch.delenv("PAYGATE_CHAIN_BATCH_MAX")
    assert load_settings().chain_batch_max == 1  # off unless asked


def test_config_file_toml(tmp_path) -> None:
    config = tmp_path / "paygate.toml"
    config.write_text('listen = "127.0.0.1:9999"\nmax_concurrent_requests = 7\n')
    settings = load_settings(config)
    assert settings.listen_port == 9999
    assert settings.max_concurrent_requests == 7
