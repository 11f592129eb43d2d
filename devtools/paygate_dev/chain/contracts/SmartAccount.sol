// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

import {ERC4337} from "solady/src/accounts/ERC4337.sol";

/// @title A smart-account payer for paygate's local chain (tests and demo only).
/// @notice Solady's ERC-4337 account (npm `solady`) with nothing added but its EIP-712 name:
/// owned by one EOA, deployed as an ERC-1967 proxy by Solady's ERC4337Factory at an address
/// known before deployment (the ERC-6492 case), and answering ERC-1271 `isValidSignature`
/// through ERC-7739's nested typed data (the owner signs the app's message wrapped in
/// `TypedDataSign`, or a personal message wrapped in `PersonalSign`), as current smart wallets do.
contract SmartAccount is ERC4337 {
    function _domainNameAndVersion()
        internal
        pure
        override
        returns (string memory name, string memory version)
    {
        return ("PaygateSmartAccount", "1");
    }
}
