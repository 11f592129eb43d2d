"""No test module imports another (tests/README.md): what tests share lives in tests/fixtures/
(``*_support.py`` helpers, fixtures as pytest plugins listed in tests/conftest.py). An import
of a test module ties two test files together: a fixture imported from one becomes a fixture of
both, and moving, renaming or deleting one test breaks the other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"


def _is_test_module(name: str) -> bool:
    return name.rpartition(".")[2].startswith("test_")


def imported_test_modules(package: str, source: str) -> set[str]:
    """The test modules (``test_*``) ``source`` imports, at any depth, relative ones resolved,
    through ``importlib.import_module("...")`` and ``pytest_plugins`` too. ``package``: the
    dotted name of the package ``source`` is in."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names = [node.args[0].value]
        elif isinstance(node, ast.Assign) and any(
            isinstance(target, ast.Name) and target.id == "pytest_plugins"
            for target in node.targets
        ):
            names = [
                item.value
                for item in ast.walk(node.value)
                if isinstance(item, ast.Constant) and isinstance(item.value, str)
            ]
        found.update(name for name in names if _is_test_module(name))
    return found


def test_no_module_under_tests_imports_a_test_module() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            imported_test_modules(".".join(path.relative_to(ROOT).parent.parts), path.read_text())
        )
        for path in sorted(TESTS.rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}


def test_every_way_of_importing_a_test_module_is_found() -> None:
    # The check above must be able to fail: each spelling of the import is caught.
    here = "tests.unit.paygate.x402"
    ledger, layering = "tests.unit.paygate.x402.test_ledger", "tests.unit.test_layering"
    spellings = [
        ("from tests.unit.paygate.x402.test_ledger import Clock", ledger),
        ("import tests.unit.paygate.x402.test_ledger", ledger),
        ("import tests.unit.paygate.x402.test_ledger as other", ledger),
        ("from tests.unit.paygate.x402 import test_ledger", ledger),
        ("from .test_ledger import request", ledger),
        ("from . import test_ledger", ledger),
        (
            "from ..client.test_client_terms import TERMS",
            "tests.unit.paygate.client.test_client_terms",
        ),
        ("def f():\n    from tests.unit.test_layering import ROOT", layering),
        ("import importlib\nimportlib.import_module('tests.unit.test_layering')", layering),
        ("pytest_plugins = ['tests.fixtures.chain', 'tests.unit.test_layering']", layering),
    ]
    for source, module in spellings:
        assert module in imported_test_modules(here, source), source
    # What tests may import: the fixtures, the code under test, the standard library.
    allowed = (
        "from tests.fixtures.ledger_support import Clock\n"
        "from tests.fixtures import gateway_support\n"
        "pytest_plugins = ['tests.fixtures.chain']\n"
        "from paygate.x402 import ledger\n"
        "import importlib\nimportlib.import_module('paygate.x402.schemes.exact.facilitator')\n"
    )
    assert imported_test_modules(here, allowed) == set()
