"""The ``paygate`` command line: one sub-command module per job, registered here.

Errors from paygate and enclave end as one line ``error [code]: message`` and exit status 2,
never a traceback: messages are written to be safe to show (no secrets).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from enclave import EnclaveError
from paygate import restore_recursion_limit
from paygate.cli import attest, deploy, discover, keys, ledger, payments, request, serve, upstream
from paygate.errors import PaygateError

# The sub-commands import eth-account/web3, whose py_ecc raises the recursion limit to 100,000.
restore_recursion_limit()

COMMANDS = (keys, serve, payments, ledger, upstream, discover, deploy, request, attest)
# Commands that live outside the shipped package (the dev tooling's ``demo`` and
# ``fake-upstream``) register through this entry point group when installed.
PLUGIN_GROUP = "paygate.commands"
DEV_ONLY = ("demo", "fake-upstream")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="paygate", description="Paid, end-to-end-encrypted inference proxy appliance."
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (env PAYGATE_* overrides it)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    plugged = set()
    for entry in entry_points(group=PLUGIN_GROUP):
        entry.load()(sub)
        plugged.add(entry.name)
    for name in DEV_ONLY:
        if name not in plugged:
            missing = sub.add_parser(name, help="(needs the dev tooling: bash scripts/setup.sh)")
            missing.set_defaults(run=_dev_tooling_missing)
    return parser


def _dev_tooling_missing(args: argparse.Namespace) -> int:
    raise PaygateError(
        f"`paygate {args.command}` is part of the dev tooling, which is not installed here: "
        "pip install -e devtools (bash scripts/setup.sh does it)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    # The TPM's C library (tss2) prints its own ERROR/WARNING lines to stderr for failures that
    # paygate already reports as one clear error; silence it unless the operator asks for it.
    os.environ.setdefault("TSS2_LOG", "all+none")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (PaygateError, EnclaveError) as exc:
        print(f"error [{exc.code}]: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
