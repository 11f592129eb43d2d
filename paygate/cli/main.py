"""The ``paygate`` command line: one sub-command module per job, registered here.

Errors from paygate and enclave end as one line ``error [code]: message`` and exit status 2,
never a traceback: messages are written to be safe to show (no secrets). Output into a closed
pipe ends with status 141 and nothing on stderr.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from pathlib import Path

from enclave import EnclaveError
from paygate import restore_recursion_limit
from paygate.errors import PaygateError

# Each command is the module paygate.cli.<name> with a register(sub). Only the command being
# run is imported: all of them together pull in web3, aiohttp, httpx, docker … (seconds of
# start-up); ``paygate --help`` and unknown commands import them all.
COMMANDS = (
    "init",
    "keys",
    "serve",
    "payments",
    "receipts",
    "ledger",
    "upstream",
    "discover",
    "deploy",
    "request",
    "attest",
    "doctor",
    "release",
    "console",
    "log",
)
# Commands that live outside the shipped package (the dev tooling's ``demo`` and
# ``fake-upstream``) register through this entry point group when installed.
PLUGIN_GROUP = "paygate.commands"
DEV_ONLY = ("demo", "fake-upstream")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``only``, just that command's (see COMMANDS)."""
    parser = argparse.ArgumentParser(
        prog="paygate", description="Paid, end-to-end-encrypted inference proxy appliance."
    )
    parser.add_argument(
        "--config", type=Path, default=None, help="TOML settings file (env PAYGATE_* overrides it)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if only in (None, name):
            importlib.import_module(f"paygate.cli.{name}").register(sub)
    plugged = set()
    for entry in entry_points(group=PLUGIN_GROUP):
        if only in (None, entry.name):
            entry.load()(sub)
        plugged.add(entry.name)
    for name in DEV_ONLY:
        if name not in plugged and only in (None, name):
            missing = sub.add_parser(name, help="(needs the dev tooling: bash scripts/setup.sh)")
            missing.set_defaults(run=_dev_tooling_missing)
    # The commands import eth-account/web3, whose py_ecc raises the recursion limit to 100,000.
    restore_recursion_limit()
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (after the global options), if it is a known one."""
    words = iter(argv)
    for word in words:
        if word == "--config":
            next(words, None)
        elif not word.startswith("-"):
            known = set(COMMANDS) | set(DEV_ONLY)
            known |= {entry.name for entry in entry_points(group=PLUGIN_GROUP)}
            return word if word in known else None
    return None


def _dev_tooling_missing(args: argparse.Namespace) -> int:
    raise PaygateError(
        f"`paygate {args.command}` is part of the dev tooling, which is not installed here: "
        "pip install -e devtools (bash scripts/setup.sh does it)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its status. Output into a closed pipe (``paygate … | head``) ends
    quietly with 141, as a program killed by SIGPIPE would, never a BrokenPipeError."""
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a reader that went away is noticed here, not at exit
    except BrokenPipeError:
        # The interpreter flushes stdout again on exit: point it at /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 128 + signal.SIGPIPE


def _main(argv: Sequence[str] | None) -> int:
    # The TPM's C library (tss2) prints its own ERROR/WARNING lines to stderr for failures that
    # paygate already reports as one clear error; silence it unless the operator asks for it.
    os.environ.setdefault("TSS2_LOG", "all+none")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command_of(argv))
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
