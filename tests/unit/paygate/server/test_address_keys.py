"""Per-address keys (paygate.server.forwarded.address_key) and the body shaper's sans-IO rules."""

from __future__ import annotations

import json

import pytest

from paygate.server.forwarded import address_key, client_address, parse_networks
from paygate.upstream.engines import profile_for
from paygate.upstream.engines.limits import LimitRefused
from paygate.upstream.errors import LengthKeyRefused, OptionRefused
from paygate.upstream.shaping import RequestShaper


@pytest.mark.parametrize(
    ("address", "key"),
    [
        ("198.51.100.9", "198.51.100.9"),
        ("::ffff:198.51.100.9", "198.51.100.9"),  # a dual-stack socket's IPv4 peer
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not an address", "not an address"),
    ],
)
def test_one_host_is_one_key(address, key) -> None:
    assert address_key(address) == key


def test_the_prefix_is_configurable() -> None:
    assert address_key("2001:db8:1:2::1", 48) == "2001:db8:1::/48"
    assert address_key("2001:db8:1:2::1", 128) == "2001:db8:1:2::1/128"


def test_a_forwarded_mapped_address_is_its_ipv4() -> None:
    proxies = parse_networks(["127.0.0.1"])
    assert client_address("127.0.0.1", ["::ffff:203.0.113.7"], proxies) == "203.0.113.7"
    assert client_address("::ffff:203.0.113.7", [], ()) == "203.0.113.7"


def shaper(engine: str, cap: int = 32, **kw) -> RequestShaper:
    return RequestShaper(profile_for(engine), cap=cap, **kw)


def test_the_shaped_limit_is_written_where_the_engine_reads_it() -> None:
    body = json.dumps({"model": "m", "messages": [], "max_completion_tokens": 5}).encode()
    llama = shaper("llama-server").shape("/v1/chat/completions", body)
    assert llama is not None
    # llama-server never reads max_completion_tokens: unbounded, so the cap, in n_predict too
    assert (llama.tokens, llama.data["n_predict"], llama.data["max_completion_tokens"]) == (
        32,
        32,
        32,
    )
    vllm = shaper("vllm").shape("/v1/chat/completions", body)
    assert vllm is not None
    assert (vllm.tokens, vllm.data.get("max_tokens")) == (5, None)


def test_n_and_best_of_multiply_what_is_priced() -> None:
    body = json.dumps({"model": "m", "prompt": "x", "n": 2, "best_of": 3, "max_tokens": 4})
    shaped = shaper("vllm").shape("/v1/completions", body.encode())
    assert shaped is not None
    assert shaped.max_output == 12


@pytest.mark.parametrize(
    ("engine", "fields", "error"),
    [
        ("vllm", {"max_tokens": 0}, LimitRefused),
        ("openai", {"max_completion_tokens": -1}, LimitRefused),
        ("llama-server", {"n": 3}, LimitRefused),
        ("vllm", {"n": 0}, LimitRefused),
        ("ollama", {"max_tokens": True}, LimitRefused),
        ("ollama", {"min_tokens": 3}, LengthKeyRefused),
        ("vllm", {"num_return_sequences": 3}, LengthKeyRefused),
        ("vllm", {"priority": 1}, OptionRefused),
        ("llama-server", {"lora": [{"id": 0, "scale": 1}]}, OptionRefused),
    ],
)
def test_what_cannot_be_priced_is_refused(engine, fields, error) -> None:
    body = json.dumps({"model": "m", "messages": [], **fields}).encode()
    with pytest.raises(error):
        shaper(engine).shape("/v1/chat/completions", body)


def test_allowed_options_pass_and_other_routes_are_checked_for_options_only() -> None:
    allowed = shaper("ollama", allowed_options=frozenset({"keep_alive"}))
    body = json.dumps({"model": "m", "prompt": "x", "keep_alive": 0}).encode()
    assert allowed.shape("/api/generate", body) is not None
    with pytest.raises(OptionRefused):
        shaper("ollama").check_options("/api/embed", body)
    assert shaper("ollama").shape("/api/embed", body) is None
