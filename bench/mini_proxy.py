"""The baseline: a minimal aiohttp streaming reverse proxy (one ClientSession), for the benchmark.

What a careful engineer writes in 70 lines: every path forwarded, a small header allowlist both
ways, the body relayed chunk by chunk as it arrives. No limits, no timeouts but aiohttp's
defaults, no payment, no sealing, no metrics, no access log.

    python -m bench.mini_proxy --port 9001 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
REQUEST_HEADERS = ("Content-Type", "Accept", "User-Agent")
RESPONSE_HEADERS = ("Content-Type", "Cache-Control")


def build(upstream: str) -> web.Application:
    app = web.Application()

    async def session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=1024)
        app[SESSION] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app[SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = {k: request.headers[k] for k in REQUEST_HEADERS if k in request.headers}
        body = await request.read()
        async with request.app[SESSION].request(
            request.method, upstream + request.path_qs, data=body or None, headers=headers
        ) as reply:
            out = {k: reply.headers[k] for k in RESPONSE_HEADERS if k in reply.headers}
            response = web.StreamResponse(status=reply.status, headers=out)
            if reply.content_length is not None:
                response.content_length = reply.content_length
            await response.prepare(request)
            async for chunk in reply.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(
        build(args.upstream.rstrip("/")),
        host="127.0.0.1",
        port=args.port,
        print=None,
        access_log=None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
