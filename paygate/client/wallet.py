"""Loading a payer's wallet key from a file, the way an operator keeps one.

The file holds one secp256k1 private key as hex (``0x`` optional) on its first line, and must
not be readable by group or others (mode 0600), like the appliance's own key files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from eth_account import Account
from eth_account.signers.local import LocalAccount

from paygate.client.errors import WalletKeyError

MAX_KEY_FILE = 4096


def load_wallet(path: str | os.PathLike[str]) -> LocalAccount:
    """The eth-account wallet in ``path``; :class:`WalletKeyError` if it cannot be used."""
    file = Path(path)
    try:
        with file.open("rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            raw = handle.read(MAX_KEY_FILE + 1)
    except OSError as exc:
        raise WalletKeyError(f"cannot read wallet key file {file}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise WalletKeyError(
            f"wallet key file {file} is accessible by group or others: chmod 600 it"
        )
    lines = raw[:MAX_KEY_FILE].decode("ascii", "replace").strip().splitlines()
    text = lines[0].strip().removeprefix("0x") if lines else ""
    if len(text) != 64:
        raise WalletKeyError(f"wallet key file {file} does not hold a 32-byte hex private key")
    try:
        return Account.from_key(bytes.fromhex(text))
    except Exception:  # eth-keys raises several types for out-of-range scalars; none may echo
        raise WalletKeyError(f"wallet key file {file} does not hold a valid private key") from None
