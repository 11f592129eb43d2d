"""Several gateway worker processes on one host: a pre-forked listener and a small supervisor.

Why a pre-forked listener rather than SO_REUSEPORT: the parent binds the port once and every
worker accepts on that same socket, so a worker that dies and is restarted never leaves the
port without a listener nor drops the connections queued on its own socket (with SO_REUSEPORT
the kernel hashes connections to per-worker queues that die with the worker).

What lives in the parent: only the listening socket and the supervision (signals, restarts,
the graceful stop of all workers). It never builds the app, opens the key backend or the ledger,
and starts no thread or event loop before forking. Everything else is per worker: its key
backend session, its ledger connection(s) under its own replica name, its reconciler and lease
keeper (safe to run N times: claims are exclusive, see docs/SCALING.md). What cannot be per
worker is refused by :func:`check_workers` (a container-managed upstream; swtpm, which serves
one connection at a time; a tee-memory key, which would differ per worker; key epochs in
process memory). Key epochs in a token or TPM are one set per host, which every worker opens
(enclave.keys.shared_epochs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable

from enclave import EnclaveError
from paygate.config import ConfigError
from paygate.errors import PaygateError
from paygate.keys import SHARED_EPOCHS_REFUSED

log = logging.getLogger("paygate.serve")

START_REFUSED = 2  # a worker's exit status when its start failed on a paygate error (as main's)
RESTART_LIMIT = 5  # restarts of crashed workers within RESTART_WINDOW before giving up
RESTART_WINDOW = 60.0
POLL_SECONDS = 0.2


def check_workers(
    workers: int, *, upstream_mode: str, key_backend: str, tpm_tcti: str, key_epoch: float = 0
) -> None:
    """Refuse, before anything listens, a configuration that cannot run as several workers."""
    if workers <= 1:
        return
    if key_epoch and key_backend not in ("pkcs11", "tpm"):
        # The workers share one set of epochs per host, made in the token or the TPM
        # (enclave.keys.shared_epochs); memory keys cannot be opened by another process.
        raise ConfigError(SHARED_EPOCHS_REFUSED.format(backend=key_backend))
    if upstream_mode == "container":
        raise ConfigError(
            "workers > 1 needs upstream_mode attach: each worker would start its own "
            "model-server container (run the container once, attach the workers to it)"
        )
    if key_backend == "tee-memory":
        raise ConfigError(
            "workers > 1 cannot use key_backend tee-memory: each worker would generate its own "
            "key, and callers must see one (run one worker per TEE, or a shared key backend)"
        )
    if key_backend == "tpm" and tpm_tcti.startswith("swtpm"):
        raise ConfigError(
            "workers > 1 with a TPM needs a resource manager (device:/dev/tpmrm0 or tabrmd): "
            "swtpm serves one connection at a time"
        )


def listen_socket(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The one listening socket every worker accepts on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def supervise(
    count: int,
    run_worker: Callable[[int], int],
    *,
    grace_seconds: float,
    on_started: Callable[[], object] | None = None,
    on_tick: Callable[[], object] | None = None,
    on_exit: Callable[[int], object] | None = None,
    on_stop: Callable[[], object] | None = None,
) -> int:
    """Fork ``count`` workers (``run_worker(index)`` runs in each and returns its exit code),
    restart one that dies (at most RESTART_LIMIT times a minute), and on SIGTERM/SIGINT stop
    them all: SIGTERM each, wait up to ``grace_seconds`` + 5 s, then SIGKILL what is left.
    A worker whose start is refused (a paygate error: configuration, ledger, key) prints its
    one line and exits START_REFUSED; then all stop and that is the status returned.

    Hooks (systemd notify, multiprocess metrics): ``on_started()`` once every worker is
    forked, ``on_tick()`` on every turn of the supervising loop, ``on_exit(pid)`` for each
    worker reaped, ``on_stop()`` when the stop begins."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    children: dict[int, int] = {}  # pid -> worker index
    restarts: list[float] = []
    status = 0

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: default signal handling, then serve until told to stop
            for sig in previous:
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = run_worker(index)
            except (PaygateError, EnclaveError) as exc:  # a start refused: the one clear line
                print(f"error [{exc.code}]: {exc}", file=sys.stderr, flush=True)
                code = START_REFUSED
            except BaseException as exc:  # a worker never returns into the supervisor's code
                log.error("worker %d failed: %s", index, type(exc).__name__)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    try:
        for index in range(1, count + 1):
            spawn(index)
        if on_started is not None:
            on_started()
        while not stopping:
            if on_tick is not None:
                on_tick()
            pid, code = _reap()
            if pid == 0:
                time.sleep(POLL_SECONDS)
                continue
            if on_exit is not None:
                on_exit(pid)
            index = children.pop(pid, None)
            if index is None or stopping:
                continue
            if code == START_REFUSED:
                # A configuration the worker refused (it said why): restarts cannot fix it.
                status = START_REFUSED
                break
            log.error("worker %d (pid %d) exited with %d", index, pid, code)
            now = time.monotonic()
            restarts = [t for t in restarts if now - t < RESTART_WINDOW] + [now]
            if len(restarts) > RESTART_LIMIT:
                log.error("workers keep dying: stopping")
                status = 1
                break
            spawn(index)
    finally:
        if on_stop is not None:
            on_stop()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds + 5.0
        while children and time.monotonic() < deadline:
            pid, _ = _reap()
            if pid == 0:
                time.sleep(POLL_SECONDS)
            else:
                children.pop(pid, None)
        for pid in children:
            log.error("worker pid %d did not stop in time: killed", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return status


def _reap() -> tuple[int, int]:
    """(pid, exit code) of a finished child, or (0, 0); never blocks."""
    try:
        pid, raw = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        return 0, 0
    if pid == 0:
        return 0, 0
    return pid, os.waitstatus_to_exitcode(raw)
