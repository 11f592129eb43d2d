"""Where the npm chain tools (anvil, solcjs) live, or ComponentMissing saying how to get them.

``bash scripts/setup.sh`` runs ``npm ci --prefix scripts/chain``. ``PAYGATE_CHAIN_TOOLS`` may point
at another ``node_modules`` (e.g. when paygate is installed from a wheel, not from the tree).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from paygate_dev.stack import SETUP_HINT, ComponentMissing

REPO_ROOT = Path(__file__).resolve().parents[3]
ENV_NODE_MODULES = "PAYGATE_CHAIN_TOOLS"
ANVIL_RELATIVE = Path("@foundry-rs/anvil-linux-amd64/bin/anvil")
NPM_HINT = f"npm ci --prefix scripts/chain (Debian: apt-get install nodejs npm); {SETUP_HINT}"


def node_modules() -> Path:
    """The node_modules folder holding @foundry-rs/anvil and solc."""
    override = os.environ.get(ENV_NODE_MODULES)
    return Path(override) if override else REPO_ROOT / "scripts" / "chain" / "node_modules"


def anvil_binary() -> str:
    """The anvil executable from npm (@foundry-rs/anvil@1.7.1)."""
    path = node_modules() / ANVIL_RELATIVE
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    raise ComponentMissing(f"anvil not found at {path}: {NPM_HINT}")


def solc_module() -> Path:
    """The npm solc package (solcjs, which carries its own soljson.js)."""
    path = node_modules() / "solc"
    if (path / "soljson.js").is_file():
        return path
    raise ComponentMissing(f"solc (solcjs) not found at {path}: {NPM_HINT}")


def node_binary() -> str:
    path = shutil.which("node") or shutil.which("nodejs")
    if path is None:
        raise ComponentMissing(f"node not found: apt-get install nodejs; {SETUP_HINT}")
    return path
