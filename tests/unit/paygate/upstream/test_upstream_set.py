"""Upstreams as a set (settings), cache isolation (salts, slots, refusals), and the usage and
metering of the Responses and Messages APIs: the sans-IO parts."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from pathlib import Path

import pytest

from enclave.attestation import binding
from paygate.config import ConfigError, Settings, load_settings
from paygate.server.assembly import request_shaper
from paygate.server.isolation import (
    CacheParameterRefused,
    Salts,
    ServerStateRefused,
    SlotTable,
    Tenant,
    refuse_caller_keys,
    stateless_fields,
)
from paygate.server.shaping import metered_quote
from paygate.upstream.engines import profile_for
from paygate.upstream.engines.limits import LimitRefused
from paygate.upstream.errors import ApiNotServed, LengthKeyRefused
from paygate.upstream.shaping import RequestShaper
from paygate.upstream.spec import container_spec, serving_kwargs
from paygate.upstream.usage import Usage, UsageReader, usage_from_body
from paygate.x402.metering import Quote, TokenPrice, TokenPricing

TINY = {"name": "a", "kind": "llama-server", "url": "http://127.0.0.1:9001", "models": ["tiny"]}


def test_upstream_tables_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "paygate.toml"
    config.write_text(
        'upstream_kind = "ollama"\nupstream_cpus = 2\n'
        '[[upstream]]\nname = "gpu"\nkind = "vllm"\nurl = "http://10.0.0.5:8000"\n'
        'models = ["llama3"]\nweight = 3\n'
        '[[upstream]]\nname = "cpu"\nkind = "llama-server"\nmode = "container"\n'
        'models = ["llama3"]\nmodel_path = "/models/llama3.gguf"\n'
    )
    entries = load_settings(config).upstream_entries()
    assert [(e.name, e.config.kind, e.models, e.weight) for e in entries] == [
        ("gpu", "vllm", ("llama3",), 3),
        ("cpu", "llama-server", ("llama3",), 1),
    ]
    gpu, cpu = entries
    assert gpu.config.url == "http://10.0.0.5:8000"
    assert gpu.config.api_key is None  # never the global key to another host
    assert cpu.config.mode == "container"
    assert cpu.config.name == "paygate-cpu"  # its own deployment, socket and relay
    assert cpu.config.model_name == "llama3"
    assert cpu.config.cpus == 2  # unset fields take the upstream_* settings


def test_upstreams_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAYGATE_UPSTREAMS", json.dumps([TINY, {**TINY, "name": "b"}]))
    assert [e.name for e in load_settings().upstream_entries()] == ["a", "b"]


def test_without_upstreams_the_single_settings_are_a_set_of_one() -> None:
    settings = load_settings(None, upstream_url="http://127.0.0.1:8080", upstream_kind="vllm")
    (entry,) = settings.upstream_entries()
    assert entry.models == ()  # serves every name, as one upstream always did
    assert (entry.config.url, entry.config.kind) == ("http://127.0.0.1:8080", "vllm")


@pytest.mark.parametrize(
    "upstreams",
    [
        [TINY, TINY],  # two entries, one name
        [{**TINY, "models": []}],  # serves nothing
        [{**TINY, "name": "Bad_Name"}],
        [{**TINY, "url": "ftp://x"}],
        [{**TINY, "weight": 0}],
        [{**TINY, "kind": "tgi"}],
        [{**TINY, "extra": 1}],
        [{**TINY, "url": "http://10.0.0.5:8000", "api_key_file": "/k"}],  # a key in clear
    ],
)
def test_bad_upstream_entries_are_refused(upstreams: list[dict[str, object]]) -> None:
    with pytest.raises(ConfigError):
        load_settings(None, upstreams=upstreams)


def test_salts_are_per_tenant_keyed_and_domain_separated() -> None:
    salts = Salts(b"k" * 32)
    payer = Tenant("payer", "0xAbC")
    salt = salts.salt(payer)
    assert len(salt) == 43  # 256 bits, base64url
    assert salts.salt(Tenant("payer", "0xabc")) == salt  # an address in any case
    assert salts.salt(Tenant("payer", "0xdef")) != salt
    assert salts.salt(Tenant("free", "0xabc")) != salt  # free callers: a domain of their own
    assert Salts(b"j" * 32).salt(payer) != salt  # unpredictable without the secret
    assert Salts().salt(payer) != Salts().salt(payer)  # no secret: random per process


async def test_slots_are_reused_only_by_their_last_tenant() -> None:
    table = SlotTable(2)
    far = asyncio.get_running_loop().time() + 5
    first, reuse = await table.lease("x", far)
    assert reuse is False
    await table.release(first)
    assert await table.lease("x", far) == (first, True)
    await table.release(first)
    other, reuse = await table.lease("y", far)
    assert (other != first, reuse) == (True, False)  # an unowned slot, not x's
    await table.release(other)
    third, reuse = await table.lease("z", far)  # no unowned slot left: the least recent
    assert (third, reuse) == (first, False)
    assert table.owner(first) == "z"
    await table.release(third)
    assert (await table.lease("x", far))[1] is False  # z took it over: no reuse for x


async def test_a_slot_lease_waits_for_a_free_slot_within_its_deadline() -> None:
    table = SlotTable(1)
    loop = asyncio.get_running_loop()
    index, _ = await table.lease("x", loop.time() + 5)
    with pytest.raises(TimeoutError):
        await table.lease("y", loop.time() + 0.05)
    waiter = asyncio.create_task(table.lease("y", loop.time() + 5))
    await asyncio.sleep(0)
    await table.release(index)
    assert await waiter == (index, False)


@pytest.mark.parametrize("key", ["cache_salt", "id_slot", "cache_prompt"])
def test_a_callers_cache_parameters_are_refused(key: str) -> None:
    keys = {"cache_salt", "id_slot", "cache_prompt"}
    with pytest.raises(CacheParameterRefused):
        refuse_caller_keys({"model": "m", key: None}, keys)
    refuse_caller_keys({"model": "m", "messages": [{key: 1}]}, keys)  # only the top level


def test_responses_run_stateless() -> None:
    assert stateless_fields("/v1/responses", {"input": "x", "store": True}) == {"store": False}
    assert stateless_fields("/v1/chat/completions", {"store": True}) == {}
    for key, value in (("previous_response_id", "resp_1"), ("background", True)):
        with pytest.raises(ServerStateRefused):
            stateless_fields("/v1/responses", {"input": "x", key: value})
    assert stateless_fields("/v1/responses", {"background": False}) == {"store": False}


def _sse(*events: dict[str, object]) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def test_usage_of_the_responses_api() -> None:
    whole = {"object": "response", "usage": {"input_tokens": 12, "output_tokens": 5}}
    assert usage_from_body(json.dumps(whole).encode()) == Usage(12, 5)
    stream = _sse(
        {"type": "response.created", "response": {"usage": None}},
        {"type": "response.output_text.delta", "delta": "hi"},
        {"type": "response.completed", "response": {"usage": whole["usage"]}},
    )
    reader = UsageReader("text/event-stream")
    for i in range(0, len(stream), 7):  # any split
        reader.feed(stream[i : i + 7])
    assert reader.result() == Usage(12, 5)


def test_usage_of_anthropic_messages_joins_its_events() -> None:
    whole = {
        "type": "message",
        "usage": {"input_tokens": 3, "cache_read_input_tokens": 40, "output_tokens": 7},
    }
    assert usage_from_body(json.dumps(whole).encode()) == Usage(43, 7)  # cached input counts
    stream = _sse(
        {"type": "message_start", "message": {"usage": {"input_tokens": 9, "output_tokens": 1}}},
        {"type": "content_block_delta", "delta": {"text": "a"}},
        {"type": "message_delta", "usage": {"output_tokens": 4}},
        {"type": "message_delta", "usage": {"output_tokens": 6}},
        {"type": "message_stop"},
    )
    reader = UsageReader("text/event-stream")
    reader.feed(stream)
    assert reader.result() == Usage(9, 6)


def test_an_ollama_reply_still_reads_its_counts() -> None:
    done = {"message": {"role": "assistant"}, "done": True, "prompt_eval_count": 4, "eval_count": 2}
    reader = UsageReader("application/x-ndjson")
    reader.feed(json.dumps(done).encode() + b"\n")
    assert reader.result() == Usage(4, 2)


def _quote(path: str, request: dict[str, object], engine: str = "vllm") -> Quote | None:
    """Shaped for ``engine`` and priced, as the gateway does (one RequestShaper)."""
    pricing = TokenPricing({"*": TokenPrice(Decimal(1), Decimal(2))})
    shaper = RequestShaper(profile_for(engine), cap=100)
    raw = json.dumps(request).encode()
    shaped = shaper.shape(path, raw)
    return None if shaped is None else metered_quote(pricing, shaper, raw, shaped)


@pytest.mark.parametrize(
    ("path", "limit_key", "body"),
    [
        ("/v1/responses", "max_output_tokens", {"input": "hello"}),
        ("/v1/messages", "max_tokens", {"messages": [{"role": "user", "content": "hello"}]}),
    ],
)
def test_metered_apis_are_bounded_by_their_own_limit(
    path: str, limit_key: str, body: dict[str, object]
) -> None:
    for asked, bound in ((10, 10), (10_000, 100), (100, 100), (1, 1)):
        quote = _quote(path, {"model": "m", **body, limit_key: asked})
        assert quote is not None
        assert quote.max_tokens == bound
        # The one key the engine reads carries the priced limit, and nothing else is added.
        sent = json.loads(quote.body)
        assert sent[limit_key] == bound
        assert set(sent) == {"model", limit_key, *body}
        assert quote.strip_usage is False  # both APIs always state their usage
    for refused in (0, -1, "10", 1.5):
        with pytest.raises(LimitRefused):
            _quote(path, {"model": "m", **body, limit_key: refused})


def test_responses_without_a_limit_get_the_cap_and_messages_must_name_one() -> None:
    quote = _quote("/v1/responses", {"model": "m", "input": "hello"})
    assert quote is not None
    assert (quote.max_tokens, json.loads(quote.body)["max_output_tokens"]) == (100, 100)
    with pytest.raises(LimitRefused, match="max_tokens is required"):
        _quote("/v1/messages", {"model": "m", "messages": []})


@pytest.mark.parametrize(
    ("path", "key"),
    [
        # Other APIs' names for the same knob, and more sequences: never forwarded unpriced.
        ("/v1/responses", "max_tokens"),
        ("/v1/responses", "max_completion_tokens"),
        ("/v1/responses", "n"),
        ("/v1/messages", "max_output_tokens"),
        ("/v1/messages", "max_completion_tokens"),
        ("/v1/messages", "n"),
        ("/v1/messages", "max_tokens_to_sample"),
    ],
)
def test_other_length_keys_on_these_apis_are_refused(path: str, key: str) -> None:
    limit = "max_output_tokens" if path == "/v1/responses" else "max_tokens"
    with pytest.raises(LengthKeyRefused):
        _quote(path, {"model": "m", "input": "x", limit: 10, key: 50})


@pytest.mark.parametrize("engine", ["llama-server", "ollama", "openai"])
@pytest.mark.parametrize("path", ["/v1/responses", "/v1/messages"])
def test_an_engine_that_does_not_serve_these_apis_is_never_priced_for_them(
    engine: str, path: str
) -> None:
    with pytest.raises(ApiNotServed):
        _quote(path, {"model": "m", "input": "x", "max_tokens": 5}, engine=engine)


def test_each_model_is_shaped_by_the_rules_of_the_engine_serving_it() -> None:
    shaper = RequestShaper(
        profile_for("llama-server"), cap=100, by_model={"big": profile_for("vllm")}
    )
    chat = {"messages": [{"role": "user", "content": "hi"}], "n_predict": 7}
    small = shaper.shape("/v1/chat/completions", json.dumps({"model": "tiny", **chat}).encode())
    assert small is not None
    assert small.max_output == 7  # llama-server reads n_predict
    with pytest.raises(LengthKeyRefused):  # vLLM does not: never forwarded unpriced
        shaper.shape("/v1/chat/completions", json.dumps({"model": "big", **chat}).encode())
    body = json.dumps({"model": "tiny", "input": "x"}).encode()
    with pytest.raises(ApiNotServed):
        shaper.shape("/v1/responses", body)
    shaped = shaper.shape("/v1/responses", json.dumps({"model": "big", "input": "x"}).encode())
    assert shaped is not None
    assert shaped.data["max_output_tokens"] == 100


def test_one_model_name_on_engines_of_different_kinds_does_not_start() -> None:
    other = {**TINY, "name": "b", "kind": "vllm", "url": "http://127.0.0.1:9002"}
    settings = Settings(upstreams=[TINY, other])
    with pytest.raises(ConfigError, match="different kinds"):
        request_shaper(settings)


def test_the_binding_names_each_models_upstream() -> None:
    models = (
        binding.model_digest("tiny", "sha256:" + "a" * 64, "a"),
        binding.model_digest("tiny", "sha256:" + "b" * 64, "c"),
        binding.model_digest("solo", "sha256:" + "c" * 64),
    )
    documents = [m.document() for m in models]
    assert documents[0] == {"name": "tiny", "digest": "sha256:" + "a" * 64, "upstream": "a"}
    assert "upstream" not in documents[2]  # a set of one: the document as it always was
    bound = binding.Binding(
        b"\x00" * 32,
        b"\x04" + b"\x01" * 64,
        b"\x04" + b"\x02" * 64,
        models,
        None,
        "1",
        "sha256:" + "d" * 64,
        0,
    )
    assert bound.model_digests("tiny") == {"sha256:" + "a" * 64, "sha256:" + "b" * 64}


def test_container_upstreams_are_isolated_deployments_of_their_own(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    entry = {"kind": "llama-server", "mode": "container", "models": ["m"], "model_path": str(model)}
    settings = load_settings(None, upstreams=[{**entry, "name": "one"}, {**entry, "name": "two"}])
    specs = [container_spec(e.config) for e in settings.upstream_entries()]
    assert [s.name for s in specs] == ["paygate-one", "paygate-two"]
    assert specs[0].socket_path != specs[1].socket_path  # each its own relay socket
    assert specs[0].volume != specs[1].volume
    for spec in specs:
        assert serving_kwargs(spec)["network_mode"] == "none"
        assert spec.alias == "m"


def _events(*documents: dict[str, object]) -> bytes:
    return b"".join(f"data: {json.dumps(d)}\n\n".encode() for d in documents)


def test_a_cut_messages_stream_keeps_its_running_counts_and_its_text() -> None:
    reader = UsageReader("text/event-stream")
    reader.keep_text = True
    reader.feed(
        _events(
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 9, "output_tokens": 1}},
            },
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " a"},
            },
            {"type": "message_delta", "usage": {"output_tokens": 4}},
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": " b"},
            },
        )
    )  # cut: no message_stop
    assert reader.running == Usage(9, 4)
    assert reader.text == " a b"


def test_a_cut_responses_stream_keeps_its_text() -> None:
    reader = UsageReader("text/event-stream")
    reader.keep_text = True
    reader.feed(
        _events(
            {"type": "response.created", "response": {"usage": None}},
            {"type": "response.output_text.delta", "delta": " one"},
            {"type": "response.output_text.delta", "delta": " two"},
        )
    )
    assert reader.text == " one two"
    assert reader.result() is None  # nothing stated: counted by the engine's tokenizer


@pytest.mark.parametrize("suffix", ["relay", "pull"])
def test_container_upstreams_whose_container_names_clash_are_refused(
    tmp_path: Path, suffix: str
) -> None:
    # Upstream "a"'s relay (or pull) container is paygate-a-relay, which is also the serving
    # container of an upstream named "a-relay": starting one would remove the other's.
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    entry = {"kind": "llama-server", "mode": "container", "models": ["m"], "model_path": str(model)}
    clashing = [{**entry, "name": "a"}, {**entry, "name": f"a-{suffix}"}]
    with pytest.raises(ConfigError, match=f"paygate-a-{suffix}"):
        load_settings(None, upstreams=clashing)
    # Either attached: it has no containers, so nothing clashes.
    attached = {**clashing[1], "mode": "attach", "url": "http://127.0.0.1:9001"}
    settings = load_settings(None, upstreams=[clashing[0], attached])
    assert [e.name for e in settings.upstream_entries()] == ["a", f"a-{suffix}"]


def test_container_upstreams_are_named_within_the_gateways_upstream_name(tmp_path: Path) -> None:
    # Two gateways on one engine, each with an upstream "one": each its own deployment, and
    # each knows the name the deployment had before (paygate-one) to adopt it.
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    entry = {"kind": "llama-server", "mode": "container", "models": ["m"], "model_path": str(model)}
    specs = [
        container_spec(e.config)
        for gateway in ("gw-a", "gw-b")
        for e in load_settings(
            None, upstream_name=gateway, upstreams=[{**entry, "name": "one"}]
        ).upstream_entries()
    ]
    assert [s.name for s in specs] == ["gw-a-one", "gw-b-one"]
    assert [s.volume for s in specs] == ["gw-a-one-models", "gw-b-one-models"]
    assert {(s.previous, s.previous_volume) for s in specs} == {
        ("paygate-one", "paygate-one-models")
    }
    # The clash check sees the names a gateway will use: gw-a-one's relay is gw-a-one-relay.
    with pytest.raises(ConfigError, match="gw-a-one-relay"):
        load_settings(
            None,
            upstream_name="gw-a",
            upstreams=[{**entry, "name": "one"}, {**entry, "name": "one-relay"}],
        )
