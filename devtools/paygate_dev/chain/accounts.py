"""anvil's dev accounts: the publicly known "test test ... junk" mnemonic, derived, never printed.

These keys are public knowledge and hold value only on throw-away local chains. They are still
kept out of repr() so that the habit (and the log scrapers) stay the same as for real keys.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from eth_account import Account
from eth_account.hdaccount import key_from_seed, seed_from_mnemonic
from eth_account.signers.local import LocalAccount

DEV_MNEMONIC = "test test test test test test test test test test test junk"
DEV_ACCOUNT_COUNT = 10  # anvil's default --accounts

# Roles on the dev chain, one dev account each so their transaction nonces never collide.
ADMIN = 0  # deploys the contracts and mints
FACILITATOR = 1  # the x402 facilitator's settlement signer
GATEWAY_GAS = 2  # paygate's own settlement key in chain mode
SPARE = 3  # a second facilitator in the same test module (its own nonces)
PROXY_ADMIN = 9  # deploys the FiatTokenProxies: a proxy's admin may not call the token


@dataclass(frozen=True, slots=True)
class DevAccount:
    """One funded anvil dev account (10 000 ETH at genesis)."""

    index: int
    address: str
    key: str = field(repr=False)  # 0x-hex private key

    def local_account(self) -> LocalAccount:
        return Account.from_key(self.key)


@functools.cache
def dev_accounts(count: int = DEV_ACCOUNT_COUNT) -> tuple[DevAccount, ...]:
    """The first ``count`` accounts anvil funds by default (BIP-44 m/44'/60'/0'/0/i)."""
    seed = seed_from_mnemonic(DEV_MNEMONIC, "")
    accounts = []
    for index in range(count):
        key = key_from_seed(seed, f"m/44'/60'/0'/0/{index}")
        account = Account.from_key(key)
        accounts.append(DevAccount(index=index, address=account.address, key="0x" + key.hex()))
    return tuple(accounts)


def new_account() -> LocalAccount:
    """A fresh random account (no ETH, no tokens): a payer or a seller with a clean history."""
    return Account.create()
