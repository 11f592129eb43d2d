"""`paygate serve` without `replica_id`: the name kept in the state directory (real processes).

A restart after a crash (SIGKILL: nothing handed over) takes the log's recovery turn back at
once, however long its lease; a second gateway on the same state directory, or one on a copy of
it made on another machine, never runs under the first one's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from paygate.server.replica_name import NAME_FILE
from tests.fixtures.components import free_port
from tests.fixtures.scale_support import fake_upstream
from tests.fixtures.serve_support import make_key, served
from tests.fixtures.tlog_support import ORIGIN

# Ten minutes between passes: a turn's lease (three intervals) outlasts every wait here, so a
# process that holds it took it back under its own name, never after the lease ran out.
INTERVAL = "200"


@asynccontextmanager
async def _gateway(
    state: Path, upstream: str
) -> AsyncIterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
        "PAYGATE_KEY_BACKEND": "software",
        "PAYGATE_KEY_FILE": str(state / "key.pem"),
        "PAYGATE_LISTEN": f"127.0.0.1:{port}",
        "PAYGATE_UPSTREAM_URL": upstream,
        "PAYGATE_LEDGER_PATH": str(state / "payments.db"),
        "PAYGATE_TRANSPARENCY_LOG": "true",
        "PAYGATE_LOG_ORIGIN": ORIGIN,
        "PAYGATE_RECONCILE_INTERVAL_SECONDS": INTERVAL,
    }
    async with served(env, port) as live:
        yield live


async def _metrics(url: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as client, client.get(url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


async def _until(url: str, name: str, at_least: float) -> dict[str, float]:
    """The process's metrics once ``name`` reached ``at_least`` (30 s at most)."""
    async with asyncio.timeout(30):
        while True:
            seen = await _metrics(url)
            if seen.get(name, 0) >= at_least:
                return seen
            await asyncio.sleep(0.1)


async def _scan_kept(state: Path) -> None:
    """Once the turn's holder kept its scan in the ledger (after its pass: the pass's metric
    comes before that write), 30 s at most."""
    async with asyncio.timeout(30):
        while True:
            with contextlib.closing(sqlite3.connect(state / "payments.db", timeout=5)) as db:
                row = db.execute("SELECT checked FROM tlog_recovery WHERE id = 1").fetchone()
            if row is not None and row[0] is not None:
                return
            await asyncio.sleep(0.1)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)  # a crash: the turn is not handed over
    proc.wait(10)


async def test_a_restart_after_a_crash_takes_the_recovery_turn_back_at_once(tmp_path):
    make_key(tmp_path / "key.pem")
    async with fake_upstream() as (_, upstream):
        async with _gateway(tmp_path, upstream) as (url, proc):
            await _until(url, "paygate_tlog_recovery_holding", 1)
            _kill(proc)
        async with _gateway(tmp_path, upstream) as (url, _):
            seen = await _until(url, "paygate_tlog_recovery_scan_seconds_count", 1)
            assert seen["paygate_tlog_recovery_holding"] == 1


async def _second_does_not_hold(tmp_path: Path, upstream: str) -> None:
    """A second gateway on ``tmp_path`` while a first one holds the turn: it reads the ledger's
    scan from the turn row (it asked and was refused), and does not hold it."""
    async with _gateway(tmp_path, upstream) as (first, _):
        await _until(first, "paygate_tlog_recovery_scan_seconds_count", 1)
        async with _gateway(tmp_path, upstream) as (second, _):
            seen = await _until(second, "paygate_tlog_recovery_checked_timestamp_seconds", 1)
            assert seen["paygate_tlog_recovery_holding"] == 0
            assert (await _metrics(first))["paygate_tlog_recovery_holding"] == 1


async def test_two_gateways_on_one_state_directory_never_share_its_name(tmp_path):
    make_key(tmp_path / "key.pem")
    async with fake_upstream() as (_, upstream):
        await _second_does_not_hold(tmp_path, upstream)


async def test_a_state_directory_copied_from_another_machine_gets_a_name_of_its_own(tmp_path):
    make_key(tmp_path / "key.pem")
    async with fake_upstream() as (_, upstream):
        async with _gateway(tmp_path, upstream) as (url, proc):
            await _until(url, "paygate_tlog_recovery_holding", 1)
            await _scan_kept(tmp_path)  # what the copy shows while that turn is not its own
            _kill(proc)
        kept = json.loads((tmp_path / NAME_FILE).read_text())
        # The copy's original still runs, elsewhere, under this name (the same ledger).
        (tmp_path / NAME_FILE).write_text(json.dumps({**kept, "host": "elsewhere"}))
        async with _gateway(tmp_path, upstream) as (url, _):
            seen = await _until(url, "paygate_tlog_recovery_checked_timestamp_seconds", 1)
            assert seen["paygate_tlog_recovery_holding"] == 0  # the original's turn, not its
        assert json.loads((tmp_path / NAME_FILE).read_text())["name"] != kept["name"]
