"""systemd's notify protocol (``Type=notify``): READY=1, STOPPING=1, STATUS=..., WATCHDOG=1.

The protocol is one datagram of ``KEY=value`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace); see sd_notify(3). It is
small and stable enough that a few lines here beat a dependency: the PyPI wrappers either
bind libsystemd (a C build for one ``sendto``) or are unmaintained copies of these lines.

Without ``$NOTIFY_SOCKET`` (not under systemd, or ``Type=exec``) every call does nothing.
The watchdog pings come from a task on the gateway's event loop, so a loop that is stuck
(or a process that is stopped) stops pinging and systemd restarts the service after
``WatchdogSec=``. ``$WATCHDOG_PID``, when set, must be this process, else no pings are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger("paygate.systemd")
_MAX_STATUS = 200  # a status line, not a report


class Notifier:
    """Sends notify messages to ``socket_path``; a no-op when it is None."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self._address = _address(socket_path) if socket_path else None
        self.watchdog_usec = watchdog_usec

    @classmethod
    def from_environment(cls) -> Notifier:
        """From ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``."""
        watchdog: int | None = None
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", "")
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            watchdog = int(usec)
        return cls(os.environ.get("NOTIFY_SOCKET") or None, watchdog)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields in one datagram; False if not sent (never raises)."""
        if self._address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(message)
        except OSError as exc:
            log.warning("sd_notify failed: %s", type(exc).__name__)
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.send("READY=1", _status(status), f"MAINPID={os.getpid()}")

    def status(self, status: str) -> bool:
        return self.send(_status(status))

    def stopping(self, status: str = "stopping") -> bool:
        return self.send("STOPPING=1", _status(status))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    async def watchdog_loop(self, alive: Callable[[], bool] = lambda: True) -> None:
        """Ping at half the watchdog interval while ``alive()`` holds (runs until cancelled).

        ``alive`` is where several workers report in: the main process pings only while every
        worker answered recently, so one stuck worker stops the pings too.
        """
        if self.watchdog_usec is None or self._address is None:
            return
        interval = self.watchdog_usec / 2_000_000
        while True:
            if alive():
                self.watchdog()
            await asyncio.sleep(interval)

    def start_watchdog(self, alive: Callable[[], bool] = lambda: True) -> asyncio.Task[None] | None:
        """The watchdog task on the running loop, or None when systemd asks for none."""
        if self.watchdog_usec is None or self._address is None:
            return None
        return asyncio.get_running_loop().create_task(self.watchdog_loop(alive))


async def stop_task(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _address(path: str) -> str | bytes:
    # "@name" is the abstract namespace: a leading NUL byte on the wire.
    return b"\0" + path[1:].encode() if path.startswith("@") else path


def _status(text: str) -> str:
    return "STATUS=" + " ".join(text.split())[:_MAX_STATUS]
