"""A smart-wallet payer on the dev chain: Solady's ERC-4337 account (contracts/SmartAccount.sol)
owned by one EOA, deployed (or not yet: counterfactual) by Solady's ERC4337Factory.

:class:`SmartAccount` signs the way such a wallet's owner does, so the official x402 SDK's
clients can pay with it (it is an SDK ``ClientEvmSigner``: ``address`` + ``sign_typed_data``)
and the SDK's SIWX client can sign in with it (``sign_message``):

- typed data (EIP-3009, Permit2): ERC-7739 ``TypedDataSign`` — the owner signs the app's
  message nested in the wallet's own EIP-712 domain; the signature carries the app's domain
  separator, the message's struct hash and its type so the wallet can rebuild what was signed;
- personal messages (EIP-191, sign-in-with-x): ERC-7739 ``PersonalSign`` under the wallet's
  domain;
- not deployed yet: the signature is wrapped per ERC-6492 (the factory and the call that
  deploys the wallet, then the signature, then the 32-byte magic suffix).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from eth_abi import encode
from eth_account.messages import SignableMessage, _hash_eip191_message, encode_typed_data
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress
from eth_utils import keccak, to_checksum_address
from web3 import Web3

from paygate_dev.chain.build import load_contract
from paygate_dev.chain.constants import PERMIT2_ADDRESS, USDC_ADDRESS

if TYPE_CHECKING:
    from paygate_dev.chain.anvil import Anvil

ERC6492_MAGIC = bytes.fromhex("6492" * 16)
# The wallet's EIP-712 domain (SmartAccount.sol's _domainNameAndVersion; salt 0).
ACCOUNT_NAME = "PaygateSmartAccount"
ACCOUNT_VERSION = "1"
_DOMAIN_TYPEHASH = keccak(
    text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
)
_PERSONAL_SIGN_TYPEHASH = keccak(text="PersonalSign(bytes prefixed)")
_TYPED_DATA_SIGN_FIELDS = (
    " contents,string name,string version,uint256 chainId,address verifyingContract,bytes32 salt)"
)


def install_smart_accounts(chain: Anvil) -> ChecksumAddress:
    """Deploy the account implementation and its factory once per chain; the factory's address."""
    found = chain._deployed.get("account_factory")
    if found is None:
        implementation = chain.deploy("SmartAccount")
        found = chain.deploy("ERC4337Factory", args=encode(["address"], [implementation]))
        chain._deployed["account_factory"] = found
    return found


def encode_type(primary: str, types: dict[str, list[dict[str, str]]]) -> str:
    """EIP-712 ``encodeType``: the primary type, then the struct types it references, sorted."""
    seen: set[str] = set()
    todo = [primary]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for member in types[name]:
            base = member["type"].split("[", 1)[0]
            if base in types:
                todo.append(base)

    def one(name: str) -> str:
        return f"{name}(" + ",".join(f"{m['type']} {m['name']}" for m in types[name]) + ")"

    return one(primary) + "".join(one(name) for name in sorted(seen - {primary}))


def _plain_types(types: dict[str, list[Any]]) -> dict[str, list[dict[str, str]]]:
    return {
        name: [
            {"name": f["name"], "type": f["type"]}
            if isinstance(f, dict)
            else {"name": f.name, "type": f.type}
            for f in fields
        ]
        for name, fields in types.items()
        if name != "EIP712Domain"
    }


def _plain_domain(domain: Any) -> dict[str, Any]:
    if isinstance(domain, dict):
        return dict(domain)
    return {
        "name": domain.name,
        "version": domain.version,
        "chainId": domain.chain_id,
        "verifyingContract": domain.verifying_contract,
    }


@dataclass
class SmartAccount:
    """One counterfactual-or-deployed account of ``owner`` (``index`` tells several apart)."""

    chain: Anvil
    owner: LocalAccount = field(repr=False)
    index: int = 0
    factory: ChecksumAddress = field(init=False)
    address: ChecksumAddress = field(init=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.factory = install_smart_accounts(self.chain)
        self.address = to_checksum_address(self._factory().functions.getAddress(self.salt).call())

    # -- the chain side --------------------------------------------------------------------

    @property
    def salt(self) -> bytes:
        """Solady's factory salt: the owner in the upper 160 bits (only it may use it)."""
        return bytes.fromhex(self.owner.address[2:]) + self.index.to_bytes(12, "big")

    def _factory(self) -> Any:
        return self.chain.w3.eth.contract(
            address=self.factory, abi=load_contract("ERC4337Factory").abi
        )

    def _contract(self) -> Any:
        return self.chain.w3.eth.contract(
            address=self.address, abi=load_contract("SmartAccount").abi
        )

    @property
    def deployed(self) -> bool:
        return bool(self.chain.w3.eth.get_code(self.address))

    @property
    def factory_calldata(self) -> bytes:
        """The call that deploys this account (what an ERC-6492 signature carries)."""
        return bytes.fromhex(
            self._factory().encode_abi("createAccount", args=[self.salt]).removeprefix("0x")
        )

    def deploy(self) -> None:
        """Deploy through the factory (anyone may; the admin account pays)."""
        if not self.deployed:
            self.chain.transact(self._factory().functions.createAccount(self.salt))

    def execute(self, target: str, data: bytes) -> Any:
        """The owner has the account call ``target`` (the owner pays the gas)."""
        owner = Web3.to_checksum_address(self.owner.address)
        self.chain.rpc("anvil_setBalance", [owner, hex(10**18)])
        call = self._contract().functions.execute(Web3.to_checksum_address(target), 0, data)
        tx = call.build_transaction(
            {"from": owner, "nonce": self.chain.w3.eth.get_transaction_count(owner)}
        )
        signed = self.owner.sign_transaction(tx)
        tx_hash = self.chain.w3.eth.send_raw_transaction(signed.raw_transaction)
        receipt = self.chain.wait_for_receipt(tx_hash.to_0x_hex())
        if receipt["status"] != 1:
            raise RuntimeError("the account's call reverted")
        return receipt

    def approve_permit2(self, token: str = USDC_ADDRESS, amount: int = 2**256 - 1) -> None:
        """What an `upto` payer does once: let Permit2 move the account's tokens."""
        data = self.chain.token(token).encode_abi("approve", args=[PERMIT2_ADDRESS, amount])
        self.execute(token, bytes.fromhex(data.removeprefix("0x")))

    # -- signing (ERC-7739 inside, ERC-6492 around while not deployed) ---------------------

    def _domain_separator(self) -> bytes:
        return keccak(
            encode(
                ["bytes32", "bytes32", "bytes32", "uint256", "address"],
                [
                    _DOMAIN_TYPEHASH,
                    keccak(text=ACCOUNT_NAME),
                    keccak(text=ACCOUNT_VERSION),
                    self.chain.chain_id,
                    self.address,
                ],
            )
        )

    def _owner_signs(self, digest: bytes) -> bytes:
        signed = self.owner.unsafe_sign_hash(digest)
        return bytes(signed.signature)

    def _wrapped(self, signature: bytes) -> bytes:
        if self.deployed:
            return signature
        body = encode(
            ["address", "bytes", "bytes"], [self.factory, self.factory_calldata, signature]
        )
        return body + ERC6492_MAGIC

    def sign_typed_data(
        self, domain: Any, types: dict[str, list[Any]], primary_type: str, message: dict[str, Any]
    ) -> bytes:
        """ERC-7739 ``TypedDataSign`` over the app's typed data (an SDK ClientEvmSigner)."""
        plain = _plain_types(types)
        signable = encode_typed_data(
            domain_data=_plain_domain(domain), message_types=plain, message_data=message
        )
        app_separator, contents = bytes(signable.header), bytes(signable.body)
        contents_type = encode_type(primary_type, plain)
        typehash = keccak(
            text=f"TypedDataSign({primary_type}{_TYPED_DATA_SIGN_FIELDS}{contents_type}"
        )
        struct = keccak(
            encode(
                ["bytes32", "bytes32", "bytes32", "bytes32", "uint256", "address", "bytes32"],
                [
                    typehash,
                    contents,
                    keccak(text=ACCOUNT_NAME),
                    keccak(text=ACCOUNT_VERSION),
                    self.chain.chain_id,
                    self.address,
                    bytes(32),
                ],
            )
        )
        signature = self._owner_signs(keccak(b"\x19\x01" + app_separator + struct))
        description = contents_type.encode()
        nested = signature + app_separator + contents + description
        return self._wrapped(nested + len(description).to_bytes(2, "big"))

    def personal_sign(self, digest: bytes) -> bytes:
        """ERC-7739 ``PersonalSign`` of an EIP-191 digest."""
        struct = keccak(_PERSONAL_SIGN_TYPEHASH + digest)
        signature = self._owner_signs(keccak(b"\x19\x01" + self._domain_separator() + struct))
        return self._wrapped(signature)

    def sign_message(self, signable: SignableMessage) -> SimpleNamespace:
        """eth-account's ``sign_message`` shape, as the SDK's SIWX client calls it."""
        return SimpleNamespace(signature=self.personal_sign(_hash_eip191_message(signable)))

    def is_valid_signature(self, digest: bytes, signature: bytes) -> bool:
        """The deployed account's own ERC-1271 answer."""
        answer = self._contract().functions.isValidSignature(digest, signature).call()
        return bytes(answer) == bytes.fromhex("1626ba7e")
