"""Every route through the real gateway to the FAKE model server, and the closed table."""

from __future__ import annotations

import json

import pytest
from yarl import URL

from tests.fixtures.gateway_support import running_stack

CHAT = {"model": "fake-llama", "messages": [{"role": "user", "content": "hello"}]}
FORWARDED = [
    ("POST", "/v1/chat/completions", {**CHAT, "stream": False}),
    ("POST", "/v1/completions", {"model": "m", "prompt": "hi"}),
    ("POST", "/v1/embeddings", {"model": "m", "input": ["a", "b"]}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/models/fake-llama:latest", None),
    ("POST", "/api/chat", {**CHAT, "stream": False}),
    ("POST", "/api/generate", {"model": "m", "prompt": "hi", "stream": False}),
    ("POST", "/api/embed", {"model": "m", "input": "a"}),
    ("POST", "/api/embeddings", {"model": "m", "prompt": "a"}),
    ("POST", "/api/show", {"model": "m"}),
    ("GET", "/api/tags", None),
    ("GET", "/api/version", None),
]


async def test_every_forwarded_route_matches_the_direct_answer() -> None:
    async with running_stack() as s:
        for method, path, body in FORWARDED:
            via = await s.client.request(method, s.url + path, json=body)
            direct = await s.client.request(method, s.fake_url + path, json=body)
            assert via.status == direct.status == 200, path
            assert await via.json() == await direct.json(), path
            assert float(via.headers["X-Paygate-Overhead-Ms"]) >= 0
        # Each forwarded request reached the fake exactly once via the gateway (+1 direct).
        for method, path, _ in FORWARDED:
            assert s.fake.hits[f"{method} {path}"] == 2


NEVER_FORWARDED = [
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/copy"),
    ("POST", "/api/create"),
    ("GET", "/api/ps"),
    ("GET", "/api/chat"),
    ("PUT", "/v1/chat/completions"),
    ("DELETE", "/v1/models/fake-llama:latest"),
    ("OPTIONS", "/v1/chat/completions"),
    ("HEAD", "/api/tags"),
    ("POST", "/v1/chat/completions/"),
    ("POST", "/API/CHAT"),
    ("GET", "/v1/models/a/b"),
    ("GET", "/v1/models/.."),
    ("GET", "/v1/models/"),
    ("GET", "/"),
    ("GET", "/_fake/stats"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/attestation"),  # GET is the (local) evidence route
    ("GET", "/v1/attestation/activate"),
]


@pytest.mark.parametrize(("method", "path"), NEVER_FORWARDED)
async def test_unknown_routes_are_404_and_never_reach_the_upstream(method: str, path: str) -> None:
    async with running_stack() as s:
        resp = await s.client.request(method, URL(s.url + path, encoded=True), data=b"{}")
        assert resp.status == 404
        assert resp.headers["X-Paygate-Error"] == "route_not_found"
        if method != "HEAD":
            body = await resp.json()
            if path.startswith("/api/"):
                assert body == {"error": "no such route on this gateway"}
            else:
                assert body["error"]["code"] == "route_not_found"
        assert sum(s.fake.hits.values()) == 0


async def test_path_tricks_do_not_reach_admin_routes() -> None:
    async with running_stack() as s:
        for raw in ("/api/tags/../pull", "/api/chat/%2e%2e/pull", "/api/%70ull", "//api/pull"):
            resp = await s.client.post(URL(s.url + raw, encoded=True), data=b"{}")
            assert resp.status == 404, raw
        assert not [hit for hit in s.fake.hits if "pull" in hit]


async def test_query_strings_are_not_forwarded() -> None:
    async with running_stack() as s:
        resp = await s.client.get(s.url + "/api/tags?secret=1")
        assert resp.status == 400  # refused: the route takes none (test_gateway_malformed_http)
        assert not s.fake.hits


async def test_free_endpoints() -> None:
    async with running_stack() as s:
        health = await (await s.client.get(s.url + "/health")).json()
        assert health["status"] == "ok"
        assert health["key"]["fingerprint"]
        assert (await (await s.client.get(s.url + "/health/live")).json()) == {"status": "ok"}
        ready = await s.client.get(s.url + "/health/ready")
        assert ready.status == 200
        assert (await ready.json())["checks"] == {"key": "ok", "upstream": "ok"}
        pub = await (await s.client.get(s.url + "/v1/enclave/pubkey")).json()
        assert pub["pubkey"] == s.key.public_key.hex()
        assert pub["algorithm"] == "ECIES-P256-HKDF-SHA256-AES256GCM"
        assert pub["persistent"] is False
        assert isinstance(pub["tag"], str)
        assert pub["suites"]["v2"]["name"].startswith("HPKE-Base-DHKEM-P256")
        metrics = await (await s.client.get(s.url + "/metrics")).text()
        assert 'paygate_requests_total{route="GET /health",status="200"} 1.0' in metrics
        # None of the free routes is forwarded; only readiness probes the upstream root.
        assert set(s.fake.hits) <= {"GET /"}


async def test_ready_is_503_when_the_upstream_is_down() -> None:
    async with running_stack(upstream_url="http://127.0.0.1:9", ready_probe_timeout=1.0) as s:
        resp = await s.client.get(s.url + "/health/ready")
        assert resp.status == 503
        assert (await resp.json())["checks"]["upstream"] == "unreachable"
        assert (await s.client.get(s.url + "/health/live")).status == 200


async def test_upstream_errors_keep_their_status_and_shape() -> None:
    async with running_stack() as s:
        for path, model, status in (
            ("/v1/chat/completions", "fake-error-500", 500),
            ("/api/chat", "fake-error-429", 429),
            ("/api/generate", "fake-error-404", 404),
        ):
            resp = await s.client.post(s.url + path, json={"model": model, "stream": False})
            assert resp.status == status
            body = await resp.json()
            error = body["error"] if path.startswith("/api") else body["error"]["message"]
            assert "injected" in error


async def test_unreachable_upstream_is_502_in_the_route_shape() -> None:
    async with running_stack(upstream_url="http://127.0.0.1:9") as s:
        resp = await s.client.post(s.url + "/api/chat", json=CHAT)
        assert resp.status == 502
        assert await resp.json() == {"error": "the model server could not be reached"}
        resp = await s.client.post(s.url + "/v1/chat/completions", json=CHAT)
        assert resp.status == 502
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"


async def test_header_hygiene_both_ways() -> None:
    async with running_stack() as s:
        resp = await s.client.post(
            s.url + "/v1/chat/completions",
            json={**CHAT, "model": "fake-headers"},
            headers={
                "Cookie": "a=b",
                "Authorization": "Bearer caller-secret",
                "X-Forwarded-For": "6.6.6.6",
                "X-Forwarded-Host": "evil.example",
                "X-Payment": "caller-payment",
                "Connection": "keep-alive, X-Custom",
                "X-Custom": "hop",
                "User-Agent": "test-agent",
            },
        )
        assert resp.status == 200
        seen = {k.lower(): v for k, v in s.fake.received[-1].headers.items()}
        for name in ("cookie", "authorization", "x-forwarded-host", "x-payment", "x-custom"):
            assert name not in seen, name
        assert seen["x-forwarded-for"] == "127.0.0.1"  # the caller's value is not trusted
        assert seen["host"] == s.fake_url.removeprefix("http://")
        assert seen["user-agent"] == "test-agent"
        assert seen["accept-encoding"] == "identity"
        assert seen["content-type"] == "application/json"
        dropped = ("Set-Cookie", "Payment-Response", "X-Payment-Response", "Settlement-Overrides")
        for name in dropped:
            assert name not in resp.headers, name
        assert resp.headers.getall("X-Paygate-Overhead-Ms") != ["-1"]
        assert "X-Obol-Reply-Pubkey" not in resp.headers


async def test_trusted_proxy_forwarded_for() -> None:
    async with running_stack(trusted_proxies=["127.0.0.1"]) as s:
        await s.client.get(s.url + "/api/tags", headers={"X-Forwarded-For": "1.2.3.4, 5.6.7.8"})
        assert s.fake.received[-1].headers["X-Forwarded-For"] == "5.6.7.8"


async def test_gzip_from_the_upstream_is_decoded_for_plaintext_replies() -> None:
    async with running_stack() as s:
        body = {"model": "fake-gzip", "prompt": "x", "stream": False}
        resp = await s.client.post(s.url + "/api/generate", json=body, auto_decompress=False)
        assert resp.status == 200
        assert "Content-Encoding" not in resp.headers
        assert json.loads(await resp.read())["done"] is True
