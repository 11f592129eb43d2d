"""The layer rules of docs/ARCHITECTURE.md, checked on the source: enclave never imports paygate."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_enclave_imports_neither_paygate_nor_network_stacks() -> None:
    forbidden = {"paygate", "aiohttp", "httpx", "web3", "eth_account", "docker", "requests"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & forbidden)
        for path in sorted((ROOT / "enclave").rglob("*.py"))
        if _imports(path) & forbidden
    }
    assert offenders == {}


def test_enclave_imports_hardware_bindings_lazily() -> None:
    # python-pkcs11 and tpm2-pytss are optional extras: importing enclave must not need them.
    for path in sorted((ROOT / "enclave").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top_level = {
            alias.name.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not top_level & {"pkcs11", "tpm2_pytss"}, path
