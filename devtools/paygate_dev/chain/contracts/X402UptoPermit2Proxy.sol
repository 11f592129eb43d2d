// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {Permit2} from "Permit2.sol";

/// @title An x402UptoPermit2Proxy stand-in for paygate's local chain (tests and demo only).
/// @notice The spender an x402 `upto` payer names in its Permit2 signature: it settles any amount
/// up to the signed maximum, only when called by the facilitator the witness names, and only to
/// the witness's `to`. The witness {to, facilitator, validAfter} and the settle ABI are what the
/// official x402 SDK (2.25) signs and calls; the custom errors carry the names the SDK maps to
/// its settle reasons (AmountExceedsPermitted, UnauthorizedFacilitator, PaymentTooEarly ...).
/// @dev Placed at its canonical address with anvil_setCode: no storage, no constructor state.
contract X402UptoPermit2Proxy {
    struct Witness {
        address to;
        address facilitator;
        uint256 validAfter;
    }

    Permit2 public constant PERMIT2 = Permit2(0x000000000022D473030F116dDEE9F6B43aC78BA3);
    bytes32 public constant WITNESS_TYPEHASH =
        keccak256("Witness(address to,address facilitator,uint256 validAfter)");
    // Permit2 appends this to its stub: the witness field, then the referenced types sorted.
    string public constant WITNESS_TYPE_STRING =
        "Witness witness)TokenPermissions(address token,uint256 amount)Witness(address to,address facilitator,uint256 validAfter)";

    error InvalidAmount();
    error AmountExceedsPermitted();
    error UnauthorizedFacilitator();
    error InvalidDestination();
    error InvalidOwner();
    error PaymentTooEarly();

    /// @notice Move `amount` (at most the permitted maximum) from `owner` to `witness.to`.
    function settle(
        Permit2.PermitTransferFrom calldata permit,
        uint256 amount,
        address owner,
        Witness calldata witness,
        bytes calldata signature
    ) external {
        if (amount == 0) revert InvalidAmount();
        if (amount > permit.permitted.amount) revert AmountExceedsPermitted();
        if (msg.sender != witness.facilitator) revert UnauthorizedFacilitator();
        if (witness.to == address(0)) revert InvalidDestination();
        if (owner == address(0)) revert InvalidOwner();
        if (block.timestamp < witness.validAfter) revert PaymentTooEarly();
        bytes32 witnessHash =
            keccak256(abi.encode(WITNESS_TYPEHASH, witness.to, witness.facilitator, witness.validAfter));
        PERMIT2.permitWitnessTransferFrom(
            permit,
            Permit2.SignatureTransferDetails({to: witness.to, requestedAmount: amount}),
            owner,
            witnessHash,
            WITNESS_TYPE_STRING,
            signature
        );
    }
}
