"""How the command line fails, as an operator sees it: a start that cannot work prints one line
``error [code]: message`` and exits 2 (no traceback, no asyncio noise about generators or
sessions left open), one worker or several; output into a pipe whose reader went away
(``paygate … | head``) ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.attestation_standins import FIXTURES
from tests.fixtures.components import free_port

PAYGATE = str(Path(sys.executable).with_name("paygate"))
NOISE = ("Traceback", "asynchronous generator", "Unclosed", "Exception ignored", " ERROR ")
SELLER = "0x000000000000000000000000000000000000dEaD"
SEV = FIXTURES / "sev-snp"
# `paygate` without psycopg: a None entry in sys.modules is Python's own "not installed".
WITHOUT_PSYCOPG = (
    "import sys; sys.modules['psycopg'] = sys.modules['psycopg_pool'] = None; "
    "from paygate.cli.main import main; sys.argv[0] = 'paygate'; sys.exit(main())"
)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("key") / "key.pem"
    subprocess.run(
        [PAYGATE, "keys", "create", "--backend", "software", "--key-file", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return path


def _closed_port() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there


def _serve(key: Path, tmp_path: Path, env: dict[str, str], *args: str, python: bool = False):
    command = [sys.executable, "-c", WITHOUT_PSYCOPG] if python else [PAYGATE]
    return subprocess.run(
        [*command, "serve", "--listen", f"127.0.0.1:{free_port()}", *args],
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("PAYGATE_")},
            "PAYGATE_KEY_FILE": str(key),
            "PAYGATE_UPSTREAM_URL": _closed_port(),
            "PAYGATE_PAYMENT_MODE": "facilitator",
            "PAYGATE_PAY_TO": SELLER,
            "PAYGATE_NETWORK": "base-sepolia",
            "PAYGATE_FACILITATOR_URL": _closed_port(),
            "PAYGATE_LEDGER_PATH": str(tmp_path / "payments.db"),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def _assert_one_clean_line(run: subprocess.CompletedProcess[str], code: str, what: str) -> None:
    assert run.returncode == 2, run.stderr
    # one line (with workers, each that failed says the same line)
    (error,) = {line for line in run.stderr.splitlines() if line.startswith("error [")}
    assert error.startswith(f"error [{code}]: {what}"), run.stderr
    for noise in NOISE:
        assert noise not in run.stderr, run.stderr


UPTO = {
    "PAYGATE_PAYMENT_SCHEMES": '["exact", "upto"]',
    "PAYGATE_TOKEN_PRICES": '{"*": {"input": "1", "output": "1"}}',
}


def test_ledger_url_without_psycopg_is_one_line(key: Path, tmp_path: Path) -> None:
    run = _serve(
        key,
        tmp_path,
        {"PAYGATE_LEDGER_URL": f"postgresql://paygate@127.0.0.1:{free_port()}/ledger"},
        python=True,
    )
    _assert_one_clean_line(run, "ledger_unavailable", "the PostgreSQL ledger needs psycopg")


def test_unreachable_postgresql_ledger_is_one_line(key: Path, tmp_path: Path) -> None:
    url = f"postgresql://paygate:s3cret-pw@127.0.0.1:{free_port()}/ledger"
    run = _serve(key, tmp_path, {"PAYGATE_LEDGER_URL": url})
    _assert_one_clean_line(run, "ledger_unavailable", "cannot connect to the PostgreSQL ledger")
    assert "s3cret-pw" not in run.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_failure_after_the_session_opened_is_one_line(
    key: Path, tmp_path: Path, workers: str
) -> None:
    # upto asks the facilitator at start, after the key, the session and the ledger opened.
    run = _serve(key, tmp_path, UPTO, "--workers", workers)
    _assert_one_clean_line(run, "config_error", "upto needs the facilitator's GET /supported")


def _into_a_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """``paygate ARGS | head`` where head has already gone: the read end is closed first."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [PAYGATE, *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


@pytest.mark.parametrize("form", [["--json"], []])
def test_output_into_a_closed_pipe_ends_quietly(form: list[str]) -> None:
    run = _into_a_closed_pipe(
        "attest", "verify-file", str(SEV / "virtee_report_milan.hex"), "--kind", "sev-snp",
        "--cert", str(SEV / "virtee_vcek_milan.der"), "--at", "2025-06-01T00:00Z", *form,
    )  # fmt: skip
    assert run.stderr == ""
    assert run.returncode == 141  # as if killed by SIGPIPE, like any filter in a pipeline
