"""Malformed HTTP answered in the caller's JSON error shape.

aiohttp's parser refuses a bad request (oversized or too many headers, a bad Content-Length,
Content-Length with Transfer-Encoding, bad chunk sizes, NUL bytes, folded header lines) before
any handler or middleware runs, and its own ``RequestHandler.handle_error`` answers
``text/plain`` quoting the offending bytes. :class:`GatewayRequestHandler` overrides that one
hook: the same status, a stable code, ``X-Paygate-Error``, and a fixed message. It is installed
through the app's server factory (:func:`install`), so ``web.run_app`` and ``AppRunner`` both
use it.

Request targets that are not a path (asterisk-form ``OPTIONS *``, authority-form
``CONNECT host:port``, absolute-form without a path) parse, but aiohttp's router matches only
paths that begin with ``/`` and answers anything else with its own ``text/plain`` 404 before
any handler runs. :func:`install` sends them to the catch-all route instead, where the route
table refuses them like any unknown path (404 ``route_not_found``, logged, in JSON).
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_urldispatcher import AbstractRoute, UrlMappingMatchInfo

from paygate.server.errors import (
    GatewayError,
    HeadersTooLarge,
    InternalError,
    MalformedHTTP,
    UpstreamTimeout,
    api_style_for_path,
    error_response,
)


def error_for(status: int, exc: BaseException | None) -> GatewayError:
    """The gateway error for what aiohttp refused (never built from the offending bytes)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return HeadersTooLarge()
    if isinstance(exc, http_exceptions.BadHttpMessage):
        # "Too many headers" has no class of its own; its message is aiohttp's fixed text.
        if "too many headers" in str(exc.message).lower():
            return HeadersTooLarge()
        return MalformedHTTP()
    if status == 400:
        return MalformedHTTP()
    if status == 504:
        return UpstreamTimeout()
    return InternalError()


class GatewayRequestHandler(RequestHandler):
    """aiohttp's connection handler with JSON error answers."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # The class only: the exception's text can quote the request's bytes.
        self.logger.debug(
            "refused a request from %s: %s", request.remote, type(exc).__name__ if exc else status
        )
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; no error response can follow")
        try:
            api = api_style_for_path(request.path)
        except Exception:  # a request line too broken to have a path
            api = "free"
        response = error_response(error_for(status, exc), api)
        response.force_close()
        return response


class GatewayServer(web.Server):
    """``web.Server`` whose connections use :class:`GatewayRequestHandler`."""

    def __call__(self) -> RequestHandler:
        return GatewayRequestHandler(self, loop=self._loop, **self._kwargs)

    @classmethod
    def like(cls, server: web.Server) -> GatewayServer:
        return cls(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def install(app: web.Application, catch_all: AbstractRoute) -> None:
    """Make ``app``'s server (built by ``AppRunner``/``run_app``) a :class:`GatewayServer`, and
    send every request target the router cannot match to ``catch_all``.

    aiohttp has no parameter for the connection handler's class; the app's server factory is
    the one place every runner goes through, so it is wrapped on this instance. Likewise the
    router's ``resolve`` (a router subclass is deprecated in aiohttp).
    """
    make = app._make_handler

    def make_handler(*, loop: asyncio.AbstractEventLoop | None = None, **kwargs: Any) -> web.Server:
        return GatewayServer.like(make(loop=loop, **kwargs))

    app._make_handler = make_handler  # type: ignore[method-assign]

    router = app.router
    resolve = router.resolve

    async def resolve_any_target(request: web.Request) -> Any:
        if request.rel_url.path.startswith("/"):
            return await resolve(request)
        # "*", "" (authority-form, or absolute-form without a path): not a path the router
        # can walk; the catch-all's route table answers it.
        return UrlMappingMatchInfo({"tail": ""}, catch_all)

    router.resolve = resolve_any_target  # type: ignore[method-assign]
