"""Several worker processes, one /metrics: prometheus_client's multiprocess mode sums what each
worker wrote; a directory set too late (after the import) is refused, not silently wrong."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

WORKER = """
from paygate.server.metrics import Metrics
m = Metrics()
m.observe("POST /v1/chat/completions", 200)
m.duration("POST /v1/chat/completions", 0.2)
m.earned("eip155:84532", "0xToken", 1000)
"""
SCRAPER = """
import sys
from paygate.server.metrics import Metrics
sys.stdout.write(Metrics().render(in_flight=0).decode())
"""
LATE = """
import os, prometheus_client
os.environ["PROMETHEUS_MULTIPROC_DIR"] = sys.argv[1]
from paygate.server.metrics import Metrics
try:
    Metrics()
except RuntimeError as exc:
    print("refused:", exc)
"""


def _run(code: str, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return result.stdout


def test_three_workers_are_summed_in_one_scrape(tmp_path: Path) -> None:
    from paygate.server.metrics import prepare_multiprocess_dir

    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_stale.db").write_bytes(b"left by an earlier run")
    prepare_multiprocess_dir(directory)
    assert list(directory.iterdir()) == []
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    for _ in range(3):
        _run(WORKER, env)
    text = _run(SCRAPER, env)
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = (("route", "POST /v1/chat/completions"),)
    assert samples[("paygate_requests_total", (*route, ("status", "200")))] == 3
    assert samples[("paygate_request_duration_seconds_count", route)] == 3
    earned = (("asset", "0xToken"), ("network", "eip155:84532"))
    assert samples[("paygate_earned_atomic_total", earned)] == 3000


def test_directory_set_after_the_import_is_refused(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    out = _run(LATE, env, str(tmp_path))
    assert "refused: PROMETHEUS_MULTIPROC_DIR must be set before" in out


SCANNER = """
from paygate.server.metrics import Metrics
m = Metrics()
if sys.argv[1] == "failed":
    m.withdrawal_scan_failed()
elif sys.argv[1] != "idle":
    behind, pending = sys.argv[1].split(",")
    m.withdrawal_scanned(int(behind), int(pending))
"""


def test_the_withdrawal_scan_is_reported_by_whichever_worker_scanned_last(tmp_path: Path) -> None:
    """The claim lease moves between workers: the scan's success time is the newest any
    worker reported, its blocks behind and pending withdrawals those reported last (not the
    largest: a worker that lost the lease keeps its old values), its failures summed; a worker
    that never scanned changes none of them."""
    from paygate.server.metrics import prepare_multiprocess_dir

    directory = tmp_path / "metrics"
    prepare_multiprocess_dir(directory)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    for step in ("failed", "500,3", "failed", "0,1", "idle"):
        _run(SCANNER, env, step)
    samples = {
        s.name: s.value
        for family in text_string_to_metric_families(_run(SCRAPER, env))
        for s in family.samples
    }
    assert samples["paygate_batch_withdrawal_scan_failures_total"] == 2
    assert samples["paygate_batch_withdrawal_scan_behind_blocks"] == 0
    assert samples["paygate_batch_withdrawals_pending"] == 1
    assert samples["paygate_batch_withdrawal_scan_success_timestamp_seconds"] > 0
