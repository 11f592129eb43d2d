"""Shared test configuration: real components are started by the fixture plugins below."""

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.components",
    "tests.fixtures.docker",
    "tests.fixtures.llama",
    "tests.fixtures.ledgers",
    "tests.fixtures.postgres",
    "tests.fixtures.softhsm",
    "tests.fixtures.software_key",
    "tests.fixtures.swtpm",
]

# Hypothesis profiles. "default": hypothesis' own (fast, the main suite). "fuzz": 10,000
# examples per property, no deadline — selected by HYPOTHESIS_PROFILE=fuzz (scripts/test.sh
# runs tests/fuzz with it after the main suite).
import os  # noqa: E402

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "fuzz",
    # PAYGATE_FUZZ_EXAMPLES only to measure a smaller run; CI uses the 10,000.
    max_examples=int(os.environ.get("PAYGATE_FUZZ_EXAMPLES", "10000")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Nothing the tests start may touch the host's real ledger (/var/lib/paygate/payments.db):
# gateways and CLI runs that are not given a ledger get one in a directory of this test run.
# (Tests that need their own ledger still set PAYGATE_LEDGER_PATH or ledger_path themselves.)
import tempfile  # noqa: E402

_LEDGER_DIR = tempfile.mkdtemp(prefix="paygate-test-ledger-")
os.environ.setdefault("PAYGATE_LEDGER_PATH", os.path.join(_LEDGER_DIR, "payments.db"))
