"""Shared test configuration: real components are started by the fixture plugins below."""

pytest_plugins = [
    "tests.fixtures.components",
    "tests.fixtures.softhsm",
    "tests.fixtures.swtpm",
]
