"""Property tests: no body, header value, content type or path makes the gateway answer 500."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import enclave
from tests.fixtures.gateway_support import Stack, ThreadedStack

ROUTES = [
    ("POST", "/v1/chat/completions"),
    ("POST", "/api/chat"),
    ("POST", "/api/embed"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
]
# Header values as bytes: anything a client library lets through except line breaks and NUL.
header_values = st.binary(max_size=300).filter(lambda b: not set(b) & {0, 10, 13})
content_types = st.one_of(
    st.sampled_from(
        [
            enclave.CONTENT_TYPE,
            enclave.CONTENT_TYPE + "; charset=utf-8",
            "APPLICATION/X-OBOL-ENCRYPTED",
            "application/json",
            "",
        ]
    ),
    header_values,
)
bodies = st.one_of(
    st.binary(max_size=2048),
    st.binary(max_size=400).map(lambda b: b"\x01" + b),
    st.binary(max_size=400).map(lambda b: b"\x02" + b),
    st.binary(min_size=65, max_size=65).map(lambda b: b"\x01\x04" + b + b"\x00" * 28),
)
COMMON = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with ThreadedStack(
        max_body_bytes=4096, connect_timeout=1, first_byte_timeout=2, body_read_timeout=0.5
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.url, timeout=10) as c:
        yield c


def _alive(client: httpx.Client) -> None:
    assert client.get("/health/live").status_code == 200


@COMMON
@given(route=st.sampled_from(ROUTES), body=bodies, content_type=content_types)
def test_no_body_or_content_type_gives_500(
    client: httpx.Client, route: tuple[str, str], body: bytes, content_type: bytes | str
) -> None:
    method, path = route
    try:
        resp = client.request(method, path, content=body, headers={"Content-Type": content_type})
    except httpx.LocalProtocolError:
        return  # the client library refused to send it: nothing reached the gateway
    assert resp.status_code != 500
    assert resp.status_code < 500 or resp.headers.get("X-Paygate-Error") in (
        None,
        "upstream_fault",
        "upstream_unavailable",
    )
    _alive(client)


def _raw_status(stack: Stack, request: bytes) -> bytes:
    """Send raw bytes; the status line, or b"" if the server closed without answering."""
    host, port = stack.host_port
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(request)
        with contextlib.suppress(ConnectionResetError):
            return sock.makefile("rb").readline()
    return b""


@COMMON
@given(
    name=st.sampled_from(
        [
            b"X-Obol-Reply-Pubkey",
            b"Content-Type",
            b"Transfer-Encoding",
            b"X-Forwarded-For",
            b"Accept",
            b"Connection",
            b"Host",
            b"Content-Encoding",
            b"Expect",
        ]
    ),
    value=header_values,
    sealed=st.booleans(),
)
def test_no_header_value_gives_500(
    client: httpx.Client, stack: Stack, name: bytes, value: bytes, sealed: bool
) -> None:
    body = b'{"model":"m","stream":false}'
    extra = b""
    if sealed:
        body = enclave.seal_v1(stack.key.public_key, body)
        extra = b"Content-Type: " + enclave.CONTENT_TYPE.encode() + b"\r\n"
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: gw\r\n"
        + extra
        + name
        + b": "
        + value
        + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        + body
    )
    status = _raw_status(stack, request)
    assert not status.startswith(b"HTTP/1.1 5") or status.startswith(
        (b"HTTP/1.1 502", b"HTTP/1.1 503", b"HTTP/1.1 504")
    ), status
    _alive(client)


@COMMON
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.text(
        alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="?#"),
        max_size=60,
    ),
)
def test_no_path_gives_500(client: httpx.Client, method: str, path: str) -> None:
    try:
        resp = client.request(method, "/" + path.lstrip("/"), content=b"{}")
    except httpx.HTTPError:
        pass
    else:
        assert resp.status_code != 500
    _alive(client)
