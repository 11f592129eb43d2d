"""The closed route table, without sockets."""

from __future__ import annotations

import pytest

from paygate.server.routes import default_routes

TABLE = default_routes()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/models"),
        ("POST", "/api/chat"),
        ("POST", "/api/generate"),
        ("POST", "/api/embed"),
        ("POST", "/api/embeddings"),
        ("POST", "/api/show"),
        ("GET", "/api/tags"),
        ("GET", "/api/version"),
    ],
)
def test_forwarded_routes_are_paid(method: str, path: str) -> None:
    match = TABLE.match(method, path)
    assert match is not None
    assert match.route.paid
    assert match.route.target == "upstream"
    assert match.upstream_path == path


@pytest.mark.parametrize("path", ["/health", "/health/live", "/health/ready", "/metrics"])
def test_free_routes(path: str) -> None:
    match = TABLE.match("GET", path)
    assert match is not None
    assert not match.route.paid
    assert match.route.target != "upstream"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/api/pull"),
        ("POST", "/api/push"),
        ("DELETE", "/api/delete"),
        ("POST", "/api/copy"),
        ("POST", "/api/create"),
        ("GET", "/api/chat"),
        ("POST", "/api/chat/"),
        ("GET", "/v1/models/"),
        ("GET", "/v1/models/a/b"),
        ("GET", "/v1/models/.."),
        ("GET", "/v1/models/."),
        ("HEAD", "/api/tags"),
        ("get", "/api/tags"),
        ("POST", "/v1/chat/completionsX"),
    ],
)
def test_everything_else_is_unmatched(method: str, path: str) -> None:
    assert TABLE.match(method, path) is None


def test_model_id_is_one_segment_and_requoted_upstream() -> None:
    match = TABLE.match("GET", "/v1/models/llama3:8b q")
    assert match is not None
    assert match.params == {"model": "llama3:8b q"}
    assert match.upstream_path == "/v1/models/llama3:8b%20q"


def test_price_hook_is_attached_to_paid_routes_only() -> None:
    table = default_routes(price=lambda route: None)
    assert all((route.price is not None) == route.paid for route in table.routes)
