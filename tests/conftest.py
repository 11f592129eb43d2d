"""Shared test configuration: real components are started by the fixture plugins below."""

pytest_plugins = [
    "tests.fixtures.chain",
    "tests.fixtures.components",
    "tests.fixtures.docker",
    "tests.fixtures.llama",
    "tests.fixtures.ledgers",
    "tests.fixtures.postgres",
    "tests.fixtures.softhsm",
    "tests.fixtures.swtpm",
]
