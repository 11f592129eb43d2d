"""The layer rules of docs/ARCHITECTURE.md, checked on the source: enclave never imports paygate."""

from __future__ import annotations

import ast
import re
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


def _imported_modules(path: Path) -> set[str]:
    modules: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def test_upstream_and_store_never_import_the_server_or_the_cli() -> None:
    # The server imports the upstream layer (container manager, monitor), never the reverse.
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            m for m in _imported_modules(path) if m.startswith(("paygate.server", "paygate.cli"))
        )
        for package in ("paygate/upstream", "paygate/store")
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_scripts_run_in_containers_import_no_paygate() -> None:
    # relay.py and fake_model.py run inside containers with Debian's python3 (+ aiohttp) only.
    allowed = {
        "asyncio", "contextlib", "os", "signal", "sys", "__future__", "gzip", "hashlib",
        "json", "re", "collections", "dataclasses", "pathlib", "typing", "aiohttp",
    }  # fmt: skip
    for path in (
        ROOT / "paygate" / "upstream" / "relay.py",
        ROOT / "devtools" / "paygate_dev" / "fake_model.py",
    ):
        name = path.name
        assert _imports(path) <= allowed, (name, sorted(_imports(path) - allowed))


def test_shipped_code_never_imports_the_dev_tooling() -> None:
    # paygate_dev (devtools/) is installed for tests and the demo only; the product must run
    # without it. Its commands reach the CLI through an entry point, not an import.
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & {"paygate_dev", "tests"})
        for package in ("paygate", "enclave")
        for path in sorted((ROOT / package).rglob("*.py"))
        if _imports(path) & {"paygate_dev", "tests"}
    }
    assert offenders == {}


def test_only_the_factories_read_the_whole_settings() -> None:
    # Typed views are built once (app factory, key factory, CLI); the parts below take those.
    factories = {
        "paygate/server/app.py",
        "paygate/server/assembly.py",
        "paygate/tlog/assembly.py",
        "paygate/keys.py",
    }
    offenders = []
    for package in ("paygate/server", "paygate/x402", "paygate/upstream", "paygate/store",
                    "paygate/client", "paygate/tlog", "paygate/keys.py",
                    "paygate/wire.py"):  # fmt: skip
        paths = [ROOT / package] if package.endswith(".py") else (ROOT / package).rglob("*.py")
        for path in paths:
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if (
                    isinstance(node, ast.ImportFrom)
                    and node.module == "paygate.config"
                    and any(alias.name in ("Settings", "load_settings") for alias in node.names)
                    and str(path.relative_to(ROOT)) not in factories
                ):
                    offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


# --- the import order stated in docs/ARCHITECTURE.md ("```layers" block) -----------------------


def _stated_layers() -> list[list[str]]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    assert block is not None, "docs/ARCHITECTURE.md states no ```layers block"
    return [line.split() for line in block.group(1).splitlines() if line.strip()]


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = ROOT.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _every_import(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports too), relative ones resolved;
    ``from package import name`` counts as package.name when that is a module."""
    module = _module_of(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            for alias in node.names:
                name = f"{base}.{alias.name}"
                found.add(name if _is_module(name) else base)
    return found


def test_the_import_order_in_architecture_md_is_the_codes() -> None:
    layers = _stated_layers()
    rank = {unit: index for index, line in enumerate(layers) for unit in line}
    assert len(rank) == sum(map(len, layers)), "a package is listed twice"
    assert [unit for unit in rank if not _is_module(unit)] == []  # no stale names

    def unit_of(module: str) -> str | None:
        owners = [u for u in rank if module == u or module.startswith(u + ".")]
        return max(owners, key=len) if owners else None

    offenders: dict[str, list[str]] = {}
    for package in ("paygate", "enclave"):
        for path in sorted((ROOT / package).rglob("*.py")):
            here = _module_of(path)
            mine = unit_of(here)
            # Every module has its place: nothing new hides under the bare "paygate".
            assert mine is not None, here
            assert mine != "paygate" or here == "paygate", here
            for imported in _every_import(path):
                theirs = unit_of(imported)
                if theirs is not None and theirs != mine and rank[theirs] <= rank[mine]:
                    offenders.setdefault(str(path.relative_to(ROOT)), []).append(imported)
    assert offenders == {}, "imports that point up or sideways in the stated order"


def test_no_file_points_outside_the_repository() -> None:
    # The repository stands alone: facts are copied in, never referred to beside it.
    outside = ("../" + "shared", "/work/" + "shared")
    skip = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", "results"}
    offenders = []
    for path in sorted(ROOT.rglob("*")):
        if skip & set(path.relative_to(ROOT).parts) or not path.is_file():
            continue
        if path.suffix not in {".py", ".md", ".toml", ".sh", ".txt", ".service", ".conf", ""}:
            continue
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        if any(marker in text for marker in outside):
            offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
