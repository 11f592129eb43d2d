"""The loopback relay: a unix socket outside the model server's container, TCP inside it.

The serving container has no network at all (``network_mode=none``: only its own loopback).
This relay runs in a second, equally locked-down container that shares that network
namespace, so it can reach the model server on ``127.0.0.1:PORT``; it listens on a unix socket
in a directory bind-mounted from the host (mode 0700, owned by the gateway's user), which is
how the gateway, and only the gateway, gets in. See docs/UPSTREAM.md.

It is copied nowhere: the container runs this very file (bind-mounted read-only) with the
image's ``python3``, so it must stay a standalone script on the standard library only.
Usage: ``python3 -I relay.py SOCKET_PATH PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys

CHUNK = 64 * 1024  # bytes read at a time: the relay never holds more per direction
MAX_CONNECTIONS = 1024  # beyond this, new connections wait for a free slot
CONNECT_TIMEOUT = 5.0


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()  # backpressure: a slow side slows the other
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()


async def _relay(
    port: int, slots: asyncio.Semaphore, client: asyncio.StreamReader, out: asyncio.StreamWriter
) -> None:
    async with slots:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except (OSError, TimeoutError):
            out.close()
            return
        try:
            await asyncio.gather(_pump(client, up_writer), _pump(up_reader, out))
        finally:
            for writer in (up_writer, out):
                writer.close()
                with contextlib.suppress(ConnectionError, OSError):
                    await writer.wait_closed()


async def serve(socket_path: str, port: int) -> None:
    """Relay every connection to ``socket_path`` to ``127.0.0.1:port`` until SIGTERM/SIGINT."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)  # left by a previous run of this relay
    slots = asyncio.Semaphore(MAX_CONNECTIONS)
    old_umask = os.umask(0o177)  # the socket is born 0600: only its owner connects
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _relay(port, slots, r, w), path=socket_path
        )
    finally:
        os.umask(old_umask)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or not argv[2].isdigit():
        print("usage: relay.py SOCKET_PATH PORT", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[1], int(argv[2])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
