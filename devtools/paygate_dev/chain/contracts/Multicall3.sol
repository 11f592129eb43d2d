// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @title A minimal stand-in for Multicall3 at 0xcA11bde05977b3631167028862bE2a173976CA11.
/// @notice Bare anvil has no Multicall3; the x402 SDK's EVM facilitator batches its diagnostic
/// reads (balance, name, version, authorizationState) through `tryAggregate` to explain a failed
/// simulation. Only the batching entry points the SDK and common tooling use are provided.
contract Multicall3 {
    struct Call {
        address target;
        bytes callData;
    }

    struct Call3 {
        address target;
        bool allowFailure;
        bytes callData;
    }

    struct Result {
        bool success;
        bytes returnData;
    }

    function tryAggregate(bool requireSuccess, Call[] calldata calls)
        public
        payable
        returns (Result[] memory returnData)
    {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            require(success || !requireSuccess, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }

    function aggregate3(Call3[] calldata calls) public payable returns (Result[] memory returnData) {
        returnData = new Result[](calls.length);
        for (uint256 i = 0; i < calls.length; i++) {
            (bool success, bytes memory ret) = calls[i].target.call(calls[i].callData);
            require(success || calls[i].allowFailure, "Multicall3: call failed");
            returnData[i] = Result(success, ret);
        }
    }
}
