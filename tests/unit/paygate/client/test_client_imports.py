"""The client side stays light: importing paygate.client loads nothing server-only."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[4]
FORBIDDEN_PREFIXES = (
    "aiohttp",
    "docker",
    "pkcs11",
    "tpm2_pytss",
    "web3",
    "paygate.server",
    "paygate.upstream",
    "paygate.cli",
    "paygate.config",
    "paygate_dev.chain",
    "x402",
    "fastapi",
)


def test_importing_the_client_in_a_fresh_interpreter_loads_nothing_server_only() -> None:
    code = "import json, sys\nimport paygate.client\nprint(json.dumps(sorted(sys.modules)))\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    offenders = [
        name
        for name in loaded
        if any(name == p or name.startswith(p + ".") for p in FORBIDDEN_PREFIXES)
    ]
    assert offenders == []
    assert "eth_account" in loaded  # signing is the one heavy dependency, on purpose


def test_client_sources_import_only_client_safe_modules() -> None:
    allowed_paygate = (
        "paygate.client",
        "paygate.errors",
        "paygate.files",
        "paygate.jsonsafe",
        "paygate.x402",
        "paygate.wire",
    )
    server_only_x402 = {
        "processor",
        "settlement",
        "facilitator",
        "chain",
        "ledger",
        "ledger_sqlite",
        "settler",
    }
    for path in sorted((ROOT / "paygate" / "client").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                # "from paygate import wire" names paygate.wire, not the package itself.
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("paygate"):
                    assert name.startswith(allowed_paygate), (path.name, name)
                    parts = name.split(".")
                    if parts[:2] == ["paygate", "x402"] and len(parts) > 2:
                        assert parts[2] not in server_only_x402, (path.name, name)
