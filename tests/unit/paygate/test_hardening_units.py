"""The small pieces of issue 10's hardening: untrusted JSON bounds, URL redaction, log scrubbing."""

from __future__ import annotations

import logging

import pytest

from paygate import jsonsafe
from paygate.redact import redact_url, scrub, secret_parts
from paygate.server.logs import SecretTextFilter


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"[" * 40 + b"]" * 40, "deeper than 32"),
        (b'{"n": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"x" * 70, "exceeds 64 bytes"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2", "not valid JSON"),
    ],
)
def test_untrusted_json_is_refused_with_one_error(raw: bytes | str, why: str) -> None:
    with pytest.raises(jsonsafe.UntrustedJSONError) as caught:
        jsonsafe.loads(raw, max_bytes=64 if raw == b"x" * 70 else 1 << 20)
    assert why in str(caught.value)
    assert "999" not in str(caught.value)


def test_untrusted_json_parses_within_bounds() -> None:
    assert jsonsafe.loads(b'{"a": [1, {"b": null}]}', max_bytes=100) == {"a": [1, {"b": None}]}
    deep = b"[" * 500 + b"]" * 500
    assert jsonsafe.depth(jsonsafe.loads(deep, max_bytes=1 << 20, max_depth=None)) == 500
    with pytest.raises(jsonsafe.UntrustedJSONError):
        jsonsafe.loads(deep, max_bytes=1 << 20)  # the default bound: 32


def test_compact_json_is_the_standard_librarys_document_big_integers_too() -> None:
    import json

    for value in (
        {"a": 1, "b": [True, None, "é"], "c": {"d": "x"}},
        {"amount": 2**200, "nested": [{"big": -(2**70)}]},  # past 64 bits: orjson refuses
    ):
        raw = jsonsafe.dumps_compact(value)
        assert json.loads(raw) == value
        assert b" " not in raw


@pytest.mark.parametrize(
    ("url", "shown", "hidden"),
    [
        ("https://base-sepolia.g.alchemy.com/v2/AbCdEf123456GhIjKl", "/v2/***", "AbCdEf123456"),
        ("https://base-mainnet.infura.io/v3/0123456789abcdef0123456789abcdef", "/v3/***", "0123"),
        ("https://x.base-sepolia.quiknode.pro/9f8e7d6c5b4a39281706/", ".pro/***/", "9f8e7d"),
        ("https://rpc.example/base?apikey=S3cretKey99", "rpc.example/base?***", "S3cretKey99"),
        ("https://user:passw0rd@rpc.example/", "https://***@rpc.example/", "passw0rd"),
        ("http://127.0.0.1:8545", "http://127.0.0.1:8545", "@"),
    ],
)
def test_service_urls_are_redacted(url: str, shown: str, hidden: str) -> None:
    redacted = redact_url(url)
    assert shown in redacted
    assert hidden not in redacted
    assert hidden not in scrub(f"POST {url} failed", secret_parts([url])) or hidden == "@"


def test_log_lines_are_scrubbed_of_url_credentials() -> None:
    url = "https://base-sepolia.g.alchemy.com/v2/AbCdEf123456GhIjKl?token=QrySecret55"
    record = logging.LogRecord("web3", logging.DEBUG, __file__, 1, "URI: %s", (url,), None)
    assert SecretTextFilter(secret_parts([url])).filter(record)
    line = record.getMessage()
    assert "AbCdEf123456GhIjKl" not in line
    assert "QrySecret55" not in line
    assert "alchemy.com" in line
