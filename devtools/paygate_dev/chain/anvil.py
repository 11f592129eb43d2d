"""One anvil (local EVM chain) on 127.0.0.1 with USDC, Permit2 and the x402 proxy where x402
expects them.

anvil runs with ``--chain-id 84532`` (Base Sepolia) unless told otherwise.
:meth:`Anvil.install_usdc` puts Circle's FiatToken V2.2 (behind its FiatTokenProxy, as USDC is
deployed) at Base Sepolia's USDC address, deploys Uniswap's Permit2 to its canonical address
through the deterministic-deployment proxy (both from npm: ``paygate_dev.chain.registry``), and
places our stand-ins for the x402UptoPermit2Proxy and Multicall3 (no registry ships those) at
theirs. So every x402 default (asset address, EIP-712 name "USDC" and version "2", Multicall3
diagnostics, the `upto` scheme's Permit2 witness transfer through the proxy) works unchanged.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from web3 import Web3
from web3.contract import Contract as Web3Contract

from paygate.errors import PaygateError
from paygate_dev.chain import registry
from paygate_dev.chain.accounts import ADMIN, PROXY_ADMIN, DevAccount, dev_accounts
from paygate_dev.chain.build import load_contract
from paygate_dev.chain.constants import (
    BATCH_SETTLEMENT_ADDRESS,
    CHAIN_ID,
    ERC3009_DEPOSIT_COLLECTOR_ADDRESS,
    MULTICALL3_ADDRESS,
    NETWORK,
    NETWORK_V1,
    PERMIT2_ADDRESS,
    PERMIT2_DEPOSIT_COLLECTOR_ADDRESS,
    UPTO_PROXY_ADDRESS,
    USDC_ADDRESS,
    USDC_DECIMALS,
    USDC_NAME,
    USDC_VERSION,
)
from paygate_dev.chain.tools import anvil_binary
from paygate_dev.stack import free_port

__all__ = [
    "CHAIN_ID",
    "MULTICALL3_ADDRESS",
    "NETWORK",
    "NETWORK_V1",
    "USDC_ADDRESS",
    "USDC_DECIMALS",
    "USDC_NAME",
    "USDC_VERSION",
    "Anvil",
    "AnvilError",
    "start_anvil",
]

START_TIMEOUT = 10.0  # seconds for anvil to answer JSON-RPC
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
RPC_TIMEOUT = 10.0  # seconds per JSON-RPC request
RECEIPT_TIMEOUT = 10.0  # seconds for a transaction of ours to be mined


class AnvilError(PaygateError):
    """anvil did not start, or a dev-chain operation failed"""

    code = "anvil_error"


@dataclass
class Anvil:
    """An anvil process owned by this object: started on a free port, stopped by its own PID.

    Mining is instant (each transaction is mined on arrival) unless :meth:`set_automine` turns it
    off. Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    binary: str = field(default_factory=anvil_binary)
    chain_id: int = CHAIN_ID
    log_path: Path | None = None  # anvil's stdout/stderr; discarded when None
    port: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _w3: Web3 | None = field(default=None, init=False, repr=False)
    _deployed: dict[str, ChecksumAddress] = field(default_factory=dict, init=False, repr=False)

    # -- process ---------------------------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self._proc.pid if self._proc else 0

    @property
    def w3(self) -> Web3:
        if self._w3 is None:
            raise AnvilError("anvil is not running")
        return self._w3

    def start(self) -> Self:
        if self._proc is not None:
            return self
        last_error = ""
        for _ in range(3):  # another process may take the port between free_port and bind
            self.port = free_port()
            cmd = [
                self.binary, "--host", "127.0.0.1", "--port", str(self.port),
                "--chain-id", str(self.chain_id), "--silent",
            ]  # fmt: skip
            log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
            try:
                self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            finally:
                if not isinstance(log, int):
                    log.close()
            self._w3 = Web3(
                Web3.HTTPProvider(self.rpc_url, request_kwargs={"timeout": RPC_TIMEOUT})
            )
            if self._wait_ready():
                return self
            last_error = f"exit code {self._proc.poll()}"
            self.stop()
        raise AnvilError(f"anvil did not answer JSON-RPC on 127.0.0.1 ({last_error})")

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        assert self._w3 is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with contextlib.suppress(Exception):
                if self._w3.eth.chain_id == self.chain_id:
                    return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        """Stop our anvil by its PID (SIGTERM, then SIGKILL after a bounded wait). Idempotent."""
        proc, self._proc, self._w3 = self._proc, None, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- JSON-RPC ----------------------------------------------------------------------------

    def rpc(self, method: str, params: list[Any] | None = None) -> Any:
        """A raw JSON-RPC call (for anvil_* / evm_* methods web3 has no wrapper for)."""
        response = self.w3.provider.make_request(method, params or [])  # type: ignore[arg-type]
        if "error" in response:
            raise AnvilError(f"{method}: {response['error']}")
        return response.get("result")

    @property
    def accounts(self) -> tuple[DevAccount, ...]:
        """anvil's funded dev accounts (see paygate_dev.chain.accounts for the roles)."""
        return dev_accounts()

    def set_code(self, address: str, runtime_code: str) -> None:
        self.rpc("anvil_setCode", [Web3.to_checksum_address(address), runtime_code])

    def set_automine(self, enabled: bool) -> None:
        """Off: transactions wait in the mempool until :meth:`mine` (a receipt never comes)."""
        self.rpc("evm_setAutomine", [enabled])

    def mine(self, blocks: int = 1) -> None:
        self.rpc("anvil_mine", [hex(blocks)])

    def snapshot(self) -> str:
        """Snapshot the chain state. A facilitator whose signer cached a nonce must be
        restarted after :meth:`revert` (its next transaction would use a nonce from the future)."""
        return str(self.rpc("evm_snapshot"))

    def revert(self, snapshot_id: str) -> None:
        if not self.rpc("evm_revert", [snapshot_id]):
            raise AnvilError(f"evm_revert {snapshot_id} refused")

    def wait_for_receipt(self, tx_hash: str, timeout: float = RECEIPT_TIMEOUT) -> Any:
        return self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=timeout)  # type: ignore[arg-type]

    # -- contracts ---------------------------------------------------------------------------

    def deploy(
        self, contract_name: str, sender: DevAccount | None = None, *, args: bytes = b""
    ) -> ChecksumAddress:
        """Deploy a contract from the checked-in artifact; returns its address."""
        return self.deploy_code(load_contract(contract_name).bytecode, sender, args=args)

    def deploy_code(
        self, creation_code: str, sender: DevAccount | None = None, *, args: bytes = b""
    ) -> ChecksumAddress:
        """Deploy creation code (with ABI-encoded constructor ``args``); returns the address."""
        sender = sender or self.accounts[ADMIN]
        data = creation_code + args.hex()
        tx_hash = self.w3.eth.send_transaction({"from": sender.address, "data": data})  # type: ignore[typeddict-item]
        receipt = self.wait_for_receipt(tx_hash.to_0x_hex())
        if receipt["status"] != 1 or not receipt["contractAddress"]:
            raise AnvilError("a deployment failed")
        return Web3.to_checksum_address(receipt["contractAddress"])

    def transact(self, call: Any, sender: DevAccount | None = None) -> Any:
        """Send a contract call from a dev account and wait for its successful receipt."""
        sender = sender or self.accounts[ADMIN]
        tx_hash = call.transact({"from": sender.address})
        receipt = self.wait_for_receipt(tx_hash.to_0x_hex())
        if receipt["status"] != 1:
            raise AnvilError(f"{call.fn_name} reverted")
        return receipt

    def install_usdc(self) -> str:
        """USDC, Permit2, the upto proxy, the batch-settlement contract and its collectors, and
        Multicall3 at their canonical addresses.

        Returns the USDC address. Idempotent per chain.
        """
        if "usdc" not in self._deployed:
            self._deployed["usdc"] = self.deploy_fiat_token(USDC_NAME, "USDC", at=USDC_ADDRESS)
            self.set_code(MULTICALL3_ADDRESS, load_contract("Multicall3").deployed_bytecode)
            self.install_permit2()
            self.set_code(
                UPTO_PROXY_ADDRESS, load_contract("X402UptoPermit2Proxy").deployed_bytecode
            )
            for address, name in (
                (BATCH_SETTLEMENT_ADDRESS, "X402BatchSettlement"),
                (ERC3009_DEPOSIT_COLLECTOR_ADDRESS, "ERC3009DepositCollector"),
                (PERMIT2_DEPOSIT_COLLECTOR_ADDRESS, "Permit2DepositCollector"),
            ):
                self.set_code(address, load_contract(name).deployed_bytecode)
        return USDC_ADDRESS

    def deploy_fiat_token(
        self,
        name: str,
        symbol: str,
        *,
        currency: str = "USD",
        decimals: int = USDC_DECIMALS,
        at: str | None = None,
    ) -> ChecksumAddress:
        """A new FiatToken V2.2 behind its own FiatTokenProxy, initialised as Circle does
        (V1, V2, V2.1, V2.2), the admin account as owner, master minter and a minter without
        limit. ``at``: move the proxy there first (its code and its two slots), as USDC's
        address is not one we can deploy to. Returns the token's address."""
        artifacts = registry.fiat_token_artifacts()
        if "fiat_token_impl" not in self._deployed:
            library = self.deploy_code(artifacts["SignatureChecker"]["bytecode"])
            code = registry.linked(artifacts["FiatTokenV2_2"], {"SignatureChecker": library})
            self._deployed["fiat_token_impl"] = self.deploy_code(code)
        # The proxy's admin may not call the token through it: a separate account deploys it.
        proxy = self.deploy_code(
            artifacts["FiatTokenProxy"]["bytecode"],
            self.accounts[PROXY_ADMIN],
            args=bytes(12) + bytes.fromhex(self._deployed["fiat_token_impl"][2:]),
        )
        address = proxy
        if at is not None:
            address = Web3.to_checksum_address(at)
            self.set_code(address, self.w3.eth.get_code(proxy).to_0x_hex())
            for slot in (registry.PROXY_IMPLEMENTATION_SLOT, registry.PROXY_ADMIN_SLOT):
                value = self.w3.eth.get_storage_at(proxy, int(slot, 16))
                self.rpc("anvil_setStorageAt", [address, slot, "0x" + bytes(value).hex()])
        admin = self.accounts[ADMIN].address
        token = self.token(address)
        self.transact(
            token.functions.initialize(name, symbol, currency, decimals, admin, admin, admin, admin)
        )
        self.transact(token.functions.initializeV2(name))
        self.transact(token.functions.initializeV2_1(admin))
        self.transact(token.functions.initializeV2_2([], symbol))
        self.transact(token.functions.configureMinter(admin, 2**256 - 1))
        return address

    def install_permit2(self) -> ChecksumAddress:
        """Deploy Uniswap's Permit2 as it was deployed everywhere: CREATE2 through the
        deterministic-deployment proxy (anvil has it) with Permit2's salt."""
        address = Web3.to_checksum_address(PERMIT2_ADDRESS)
        if self.w3.eth.get_code(address):
            return address
        deployer = Web3.to_checksum_address(registry.CREATE2_DEPLOYER)
        if not self.w3.eth.get_code(deployer):
            raise AnvilError("this anvil has no deterministic-deployment proxy")
        code = registry.permit2().bytecode
        tx_hash = self.w3.eth.send_transaction(
            {
                "from": self.accounts[ADMIN].address,
                "to": deployer,
                "data": "0x" + registry.PERMIT2_SALT.hex() + code.removeprefix("0x"),
            }  # type: ignore[typeddict-item]
        )
        if self.wait_for_receipt(tx_hash.to_0x_hex())["status"] != 1 or not self.w3.eth.get_code(
            address
        ):
            raise AnvilError("Permit2 did not land at its canonical address")
        return address

    def token(self, address: str = USDC_ADDRESS) -> Web3Contract:
        return self.w3.eth.contract(
            address=Web3.to_checksum_address(address), abi=registry.fiat_token_abi()
        )

    def mint(self, to: str, atomic: int, token: str = USDC_ADDRESS) -> str:
        """Mint ``atomic`` units (6 decimals: 1 USDC = 1_000_000) to ``to``; returns the tx hash."""
        receipt = self.transact(
            self.token(token).functions.mint(Web3.to_checksum_address(to), atomic)
        )
        return receipt["transactionHash"].to_0x_hex()

    def approve_permit2(
        self, account: Any, atomic: int = 2**256 - 1, token: str = USDC_ADDRESS
    ) -> str:
        """``account`` (a LocalAccount) approves Permit2 to move its tokens, as an `upto` payer
        does once per token; gives it the ETH for the gas first. Returns the tx hash."""
        address = Web3.to_checksum_address(account.address)
        self.rpc("anvil_setBalance", [address, hex(10**18)])
        call = self.token(token).functions.approve(PERMIT2_ADDRESS, atomic)
        tx = call.build_transaction(
            {"from": address, "nonce": self.w3.eth.get_transaction_count(address)}
        )
        signed = account.sign_transaction(tx)
        tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction).to_0x_hex()
        if self.wait_for_receipt(tx_hash)["status"] != 1:
            raise AnvilError("approve failed")
        return tx_hash

    def allowance(
        self, owner: str, spender: str = PERMIT2_ADDRESS, token: str = USDC_ADDRESS
    ) -> int:
        return int(
            self.token(token)
            .functions.allowance(Web3.to_checksum_address(owner), Web3.to_checksum_address(spender))
            .call()
        )

    def permit2_nonce_used(self, owner: str, nonce: int) -> bool:
        """True once a Permit2 unordered nonce of ``owner`` is used (or invalidated)."""
        permit2 = self.w3.eth.contract(
            address=Web3.to_checksum_address(PERMIT2_ADDRESS), abi=registry.permit2().abi
        )
        word = int(
            permit2.functions.nonceBitmap(Web3.to_checksum_address(owner), nonce >> 8).call()
        )
        return bool(word >> (nonce & 0xFF) & 1)

    def balance_of(self, owner: str, token: str = USDC_ADDRESS) -> int:
        return int(self.token(token).functions.balanceOf(Web3.to_checksum_address(owner)).call())

    def authorization_state(
        self, authorizer: str, nonce: str | bytes, token: str = USDC_ADDRESS
    ) -> bool:
        """True once an EIP-3009 nonce of ``authorizer`` is used (or canceled)."""
        raw = bytes.fromhex(nonce.removeprefix("0x")) if isinstance(nonce, str) else nonce
        return bool(
            self.token(token)
            .functions.authorizationState(Web3.to_checksum_address(authorizer), raw)
            .call()
        )

    def cancel_authorization(
        self, authorizer: LocalAccount, nonce: str, token: str = USDC_ADDRESS, *, mine: bool = True
    ) -> str:
        """The payer's own EIP-3009 ``cancelAuthorization`` of ``nonce`` (signed by
        ``authorizer``, sent by the admin account, which pays the gas); returns the tx hash.

        ``mine=False`` only sends it (for a chain with automine off: :meth:`mine` then).
        """
        signed = authorizer.sign_typed_data(
            domain_data={
                "name": self.token(token).functions.name().call(),
                "version": USDC_VERSION,
                "chainId": self.chain_id,
                "verifyingContract": Web3.to_checksum_address(token),
            },
            message_types={
                "CancelAuthorization": [
                    {"name": "authorizer", "type": "address"},
                    {"name": "nonce", "type": "bytes32"},
                ]
            },
            message_data={
                "authorizer": authorizer.address,
                "nonce": bytes.fromhex(nonce.removeprefix("0x")),
            },
        )
        function = self.token(token).get_function_by_signature(
            "cancelAuthorization(address,bytes32,bytes)"
        )
        tx_hash = function(
            authorizer.address, bytes.fromhex(nonce.removeprefix("0x")), bytes(signed.signature)
        ).transact({"from": self.accounts[ADMIN].address})
        if mine:
            receipt = self.wait_for_receipt(tx_hash.to_0x_hex())
            if receipt["status"] != 1:
                raise AnvilError("cancelAuthorization failed")
        return tx_hash.to_0x_hex()

    def drop_transaction(self, tx_hash: str) -> None:
        """Remove a pending transaction from anvil's mempool (a dropped or replaced send)."""
        self.rpc("anvil_dropTransaction", [tx_hash])

    def eth_balance(self, address: str) -> int:
        return int(self.w3.eth.get_balance(Web3.to_checksum_address(address)))


def start_anvil(
    log_path: Path | None = None, *, with_usdc: bool = True, chain_id: int = CHAIN_ID
) -> Anvil:
    """Start an anvil and, by default, install USDC, Permit2, the upto proxy and Multicall3."""
    chain = Anvil(log_path=log_path, chain_id=chain_id).start()
    try:
        if with_usdc:
            chain.install_usdc()
    except BaseException:
        chain.stop()
        raise
    return chain
