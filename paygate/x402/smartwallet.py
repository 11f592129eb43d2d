"""Smart-wallet payers: ERC-1271 contract signatures and ERC-6492 counterfactual wallets.

An EOA's payment carries a 65-byte ECDSA signature that recovers its address: the local check
proves it with no network call. A contract wallet signs whatever its code accepts (ERC-1271
``isValidSignature``), and a wallet not deployed yet wraps that signature per ERC-6492 with the
factory call that would deploy it. Neither can be judged without the chain, so the policy is:

- **Payments** (exact, upto): a signature that is *not* 65 bytes — or is ERC-6492-wrapped — is
  a contract wallet's; the local checks pass it on every other field and the settler's verify
  decides, as it always runs before anything is served: the facilitator (the official SDK asks
  the wallet, deploying a counterfactual one in a simulation, factories on its allow-list only),
  or chain mode, whose simulation of the token's own transfer asks the wallet through the
  token's SignatureChecker. A 65-byte signature is an EOA's and must recover the payer
  (a wallet whose signatures are exactly 65 bytes is refused locally: a deliberate limit that
  keeps tampered EOA payments off the facilitator).
- **Sign-ins** (sign-in-with-x): with an RPC (``chain_rpc_url``), a signature that does not
  recover the address is put to the wallet with an ``eth_call`` of ``isValidSignature`` (one
  ``eth_getCode`` first; a counterfactual wallet is deployed inside a Multicall3 ``eth_call``,
  from an allowed factory only). Without an RPC, contract wallets cannot sign in.
- **Chain-mode settlement** deploys a counterfactual wallet through its factory (allowed
  factories only: ``erc6492_factories``) before the transfer, and sends the inner signature
  with the token's ``bytes``-signature overload.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from eth_abi import decode, encode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak, to_checksum_address

from paygate.x402.evm import abi_function

if TYPE_CHECKING:
    from paygate.x402.chain_reader import ChainReader

EIP1271_MAGIC = bytes.fromhex("1626ba7e")  # isValidSignature(bytes32,bytes)
ERC6492_MAGIC = bytes.fromhex("6492" * 16)
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"
_AGGREGATE3 = keccak(text="aggregate3((address,bool,bytes)[])")[:4]
AGGREGATE3_ABI: list[dict[str, Any]] = [
    abi_function(
        "aggregate3",
        [
            {
                "name": "calls",
                "type": "tuple[]",
                "components": [
                    {"name": "target", "type": "address"},
                    {"name": "allowFailure", "type": "bool"},
                    {"name": "callData", "type": "bytes"},
                ],
            }
        ],
        [
            {
                "name": "returnData",
                "type": "tuple[]",
                "components": [
                    {"name": "success", "type": "bool"},
                    {"name": "returnData", "type": "bytes"},
                ],
            }
        ],
        mutability="payable",
    )
]


@dataclass(frozen=True, slots=True)
class WalletDeployment:
    """An ERC-6492 wallet's way into existence: call ``factory`` with ``calldata``."""

    factory: str
    calldata: bytes


@dataclass(frozen=True, slots=True)
class WalletSignature:
    """A signature with its ERC-6492 wrapper (if any) taken off."""

    inner: bytes
    deployment: WalletDeployment | None = None

    @property
    def is_ecdsa(self) -> bool:
        """A plain 65-byte signature: an EOA's (or one we treat as such)."""
        return self.deployment is None and len(self.inner) == 65


def parse(signature: bytes) -> WalletSignature:
    """Unwrap ERC-6492 (``abi.encode(factory, calldata, signature) ‖ 0x6492…6492``);
    ValueError when the magic suffix is there but the rest is not that encoding."""
    if len(signature) < 32 or signature[-32:] != ERC6492_MAGIC:
        return WalletSignature(signature)
    try:
        factory, calldata, inner = decode(["address", "bytes", "bytes"], signature[:-32])
    except (DecodingError, ValueError, OverflowError):
        raise ValueError("a malformed ERC-6492 signature") from None
    return WalletSignature(
        bytes(inner), WalletDeployment(to_checksum_address(factory), bytes(calldata))
    )


def parse_hex(signature: str) -> WalletSignature:
    return parse(bytes.fromhex(signature.removeprefix("0x")))


def is_contract_signature(signature: str) -> bool:
    """Is this payment signature a contract wallet's (to be judged by the settler)?
    False for a 65-byte one (an EOA's, checked locally) and for a malformed ERC-6492 one."""
    try:
        return not parse_hex(signature).is_ecdsa
    except ValueError:
        return False


def is_valid_signature_data(digest: bytes, signature: bytes) -> bytes:
    """The calldata of ERC-1271 ``isValidSignature(bytes32 digest, bytes signature)``."""
    return EIP1271_MAGIC + encode(["bytes32", "bytes"], [digest, signature])


def aggregate3_data(calls: Iterable[tuple[str, bool, bytes]]) -> bytes:
    """Multicall3 ``aggregate3`` calldata for (target, allowFailure, callData) calls."""
    rows = [(to_checksum_address(target), allow, data) for target, allow, data in calls]
    return _AGGREGATE3 + encode(["(address,bool,bytes)[]"], [rows])


def aggregate3_results(raw: bytes) -> list[tuple[bool, bytes]]:
    (rows,) = decode(["(bool,bytes)[]"], raw)
    return [(bool(ok), bytes(data)) for ok, data in rows]


def revert_text(data: bytes) -> str:
    """The message of an ``Error(string)`` revert, else the raw data as hex."""
    if data[:4] == keccak(text="Error(string)")[:4]:
        try:
            return str(decode(["string"], data[4:])[0])
        except (DecodingError, ValueError, OverflowError):
            pass
    return "0x" + data.hex()


def allowed(factory: str, factories: frozenset[str]) -> bool:
    return factory.lower() in factories


def normalise_factories(factories: Iterable[str]) -> frozenset[str]:
    return frozenset(to_checksum_address(f).lower() for f in factories)


class WalletVerifier:
    """Asks a wallet on the chain behind ``reader`` whether it signed a digest (ERC-1271),
    deploying a counterfactual one in a simulation first (ERC-6492, allowed factories only)."""

    def __init__(self, reader: ChainReader, factories: Iterable[str] = ()) -> None:
        self._reader = reader
        self._factories = normalise_factories(factories)

    async def signed(self, wallet: str, digest: bytes, signature: bytes, *, network: str) -> bool:
        """True only on the wallet's magic value; SettlerUnavailable (from the reader) when the
        RPC cannot be asked."""
        await self._reader.check_chain({"network": network})
        try:
            parsed = parse(signature)
        except ValueError:
            return False
        wallet = to_checksum_address(wallet)
        w3 = self._reader.w3
        code = await self._reader.call(w3.eth.get_code, wallet)
        check = is_valid_signature_data(digest, parsed.inner)
        if code:
            answer = await self._eth_call(wallet, check)
            return answer is not None and answer[:4] == EIP1271_MAGIC and len(answer) == 32
        if parsed.deployment is None or not allowed(parsed.deployment.factory, self._factories):
            return False
        data = aggregate3_data(
            [(parsed.deployment.factory, False, parsed.deployment.calldata), (wallet, True, check)]
        )
        answer = await self._eth_call(MULTICALL3_ADDRESS, data)
        if answer is None:
            return False
        try:
            results = aggregate3_results(answer)
        except (DecodingError, ValueError, OverflowError):
            return False
        return (
            len(results) == 2
            and results[1][0]
            and results[1][1][:4] == EIP1271_MAGIC
            and len(results[1][1]) == 32
        )

    async def _eth_call(self, to: str, data: bytes) -> bytes | None:
        """The call's return data, or None when it reverts (a wallet refusing by reverting)."""
        from web3.exceptions import ContractLogicError

        w3 = self._reader.w3
        try:
            result: Any = await self._reader.call(
                w3.eth.call, {"to": to_checksum_address(to), "data": "0x" + data.hex()}
            )
        except ContractLogicError:
            return None
        return bytes(result)
