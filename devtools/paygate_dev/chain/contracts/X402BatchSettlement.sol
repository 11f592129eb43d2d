// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.37;

/// @dev The token calls the collectors and the settlement make.
interface IERC20Minimal {
    function balanceOf(address owner) external view returns (uint256);
    function transfer(address to, uint256 amount) external returns (bool);
}

/// @dev EIP-3009's receive entry point with a packed signature (FiatToken V2.2 has it).
interface IERC3009Receive {
    function receiveWithAuthorization(
        address from,
        address to,
        uint256 value,
        uint256 validAfter,
        uint256 validBefore,
        bytes32 nonce,
        bytes calldata signature
    ) external;
}

/// @dev EIP-1271.
interface IERC1271 {
    function isValidSignature(bytes32 digest, bytes calldata signature) external view returns (bytes4);
}

/// @dev Permit2's signature transfer, as Permit2 publishes it (ISignatureTransfer).
interface IPermit2Witness {
    struct TokenPermissions {
        address token;
        uint256 amount;
    }

    struct PermitTransferFrom {
        TokenPermissions permitted;
        uint256 nonce;
        uint256 deadline;
    }

    struct SignatureTransferDetails {
        address to;
        uint256 requestedAmount;
    }

    function permitWitnessTransferFrom(
        PermitTransferFrom calldata permit,
        SignatureTransferDetails calldata transferDetails,
        address owner,
        bytes32 witness,
        string calldata witnessTypeString,
        bytes calldata signature
    ) external;
}

/// @dev What the settlement contract asks of a deposit collector: move `amount` of `token` from
/// `payer` to the settlement contract, authorized by `data` for `channelId`.
interface IDepositCollector {
    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data)
        external;
}

/// @dev ECDSA (65-byte, low-s) or EIP-1271 for an address with code: what the spec calls
/// SignatureChecker.
library Signatures {
    uint256 internal constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;

    function recover(bytes32 digest, bytes memory signature) internal pure returns (address) {
        if (signature.length != 65) return address(0);
        bytes32 r;
        bytes32 s;
        uint8 v;
        assembly {
            r := mload(add(signature, 0x20))
            s := mload(add(signature, 0x40))
            v := byte(0, mload(add(signature, 0x60)))
        }
        if (uint256(s) > HALF_N) return address(0);
        if (v < 27) v += 27;
        return ecrecover(digest, v, r, s);
    }

    function valid(address signer, bytes32 digest, bytes memory signature) internal view returns (bool) {
        if (signer == address(0)) return false;
        if (signer.code.length == 0) return recover(digest, signature) == signer;
        (bool ok, bytes memory answer) =
            signer.staticcall(abi.encodeCall(IERC1271.isValidSignature, (digest, signature)));
        return ok && answer.length >= 32 && abi.decode(answer, (bytes4)) == IERC1271.isValidSignature.selector;
    }
}

/// @title A stand-in for x402BatchSettlement on paygate's local chain (tests and demo only).
/// @notice No package registry ships the batch-settlement contracts, so this is written from the
/// x402 `batch-settlement` EVM specification and what the x402 SDK 2.25 signs, calls and reads
/// (its ABI, EIP-712 domain "x402 Batch Settlement" version 1, and the ChannelConfig, Voucher,
/// ClaimBatch and Refund type hashes). Channels hold `balance` (deposits minus refunds and
/// withdrawals) and `totalClaimed`; claims only move accounting (per receiver and token), `settle`
/// sweeps what was claimed to the receiver in one transfer. A claim at or below the channel's
/// claimed total is a no-op, so a repeated claim never pays twice.
/// @dev Placed at its canonical address with anvil_setCode: no constructor state.
contract X402BatchSettlement {
    struct ChannelConfig {
        address payer;
        address payerAuthorizer;
        address receiver;
        address receiverAuthorizer;
        address token;
        uint40 withdrawDelay;
        bytes32 salt;
    }

    struct Voucher {
        ChannelConfig channel;
        uint128 maxClaimableAmount;
    }

    struct VoucherClaim {
        Voucher voucher;
        bytes signature;
        uint128 totalClaimed;
    }

    struct Channel {
        uint128 balance;
        uint128 totalClaimed;
    }

    struct Withdrawal {
        uint128 amount;
        uint40 initiatedAt;
    }

    struct ReceiverTotals {
        uint128 totalClaimed;
        uint128 totalSettled;
    }

    address public constant ERC3009_DEPOSIT_COLLECTOR = 0x4020806089470a89826cB9fB1f4059150b550004;
    address public constant PERMIT2_DEPOSIT_COLLECTOR = 0x4020425FAf3B746C082C2f942b4E5159887B0005;
    uint40 public constant MIN_WITHDRAW_DELAY = 900;
    uint40 public constant MAX_WITHDRAW_DELAY = 2_592_000;

    bytes32 private constant DOMAIN_TYPEHASH =
        keccak256("EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)");
    bytes32 private constant CHANNEL_CONFIG_TYPEHASH = keccak256(
        "ChannelConfig(address payer,address payerAuthorizer,address receiver,address receiverAuthorizer,address token,uint40 withdrawDelay,bytes32 salt)"
    );
    bytes32 private constant VOUCHER_TYPEHASH = keccak256("Voucher(bytes32 channelId,uint128 maxClaimableAmount)");
    bytes32 private constant CLAIM_ENTRY_TYPEHASH =
        keccak256("ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)");
    bytes32 private constant CLAIM_BATCH_TYPEHASH = keccak256(
        "ClaimBatch(ClaimEntry[] claims)ClaimEntry(bytes32 channelId,uint128 maxClaimableAmount,uint128 totalClaimed)"
    );
    bytes32 private constant REFUND_TYPEHASH = keccak256("Refund(bytes32 channelId,uint256 nonce,uint128 amount)");

    mapping(bytes32 => Channel) public channels;
    mapping(bytes32 => Withdrawal) public pendingWithdrawals;
    mapping(address => mapping(address => ReceiverTotals)) public receivers;
    mapping(bytes32 => uint256) public refundNonce;
    uint256 transient entered;

    event ChannelCreated(bytes32 indexed channelId, ChannelConfig config);
    event ChannelClosed(bytes32 indexed channelId, ChannelConfig config);
    event Deposited(bytes32 indexed channelId, address indexed sender, uint128 amount, uint128 balance);
    event Claimed(bytes32 indexed channelId, address indexed sender, uint128 claimAmount, uint128 totalClaimed);
    event Settled(address indexed receiver, address indexed token, address indexed sender, uint128 amount);
    event Refunded(bytes32 indexed channelId, address indexed sender, uint128 amount);
    event WithdrawInitiated(bytes32 indexed channelId, uint128 amount, uint40 initiatedAt);
    event Withdrawn(bytes32 indexed channelId, uint128 amount);

    error Reentered();
    error InvalidConfig();
    error InvalidCollector();
    error ZeroAmount();
    error DepositShort();
    error NotAuthorized();
    error InvalidVoucherSignature();
    error InvalidAuthorizerSignature();
    error ClaimExceedsVoucher();
    error ClaimExceedsBalance();
    error MixedAuthorizers();
    error InvalidRefundNonce();
    error WithdrawTooLarge();
    error NoWithdrawal();
    error WithdrawDelayNotElapsed();
    error TransferFailed();

    modifier guarded() {
        if (entered != 0) revert Reentered();
        entered = 1;
        _;
        entered = 0;
    }

    // --- identity and digests ---

    function domainSeparator() public view returns (bytes32) {
        return keccak256(
            abi.encode(
                DOMAIN_TYPEHASH, keccak256("x402 Batch Settlement"), keccak256("1"), block.chainid, address(this)
            )
        );
    }

    function _hash(bytes32 structHash) private view returns (bytes32) {
        return keccak256(abi.encodePacked(hex"1901", domainSeparator(), structHash));
    }

    function getChannelId(ChannelConfig calldata config) public view returns (bytes32) {
        return _hash(keccak256(abi.encode(CHANNEL_CONFIG_TYPEHASH, config)));
    }

    function getVoucherDigest(bytes32 channelId, uint128 maxClaimableAmount) public view returns (bytes32) {
        return _hash(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, maxClaimableAmount)));
    }

    function getRefundDigest(bytes32 channelId, uint256 nonce, uint128 amount) public view returns (bytes32) {
        return _hash(keccak256(abi.encode(REFUND_TYPEHASH, channelId, nonce, amount)));
    }

    function getClaimBatchDigest(VoucherClaim[] calldata voucherClaims) public view returns (bytes32) {
        bytes32[] memory entries = new bytes32[](voucherClaims.length);
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            VoucherClaim calldata c = voucherClaims[i];
            entries[i] = keccak256(
                abi.encode(
                    CLAIM_ENTRY_TYPEHASH, getChannelId(c.voucher.channel), c.voucher.maxClaimableAmount, c.totalClaimed
                )
            );
        }
        return _hash(keccak256(abi.encode(CLAIM_BATCH_TYPEHASH, keccak256(abi.encodePacked(entries)))));
    }

    // --- deposits ---

    function deposit(ChannelConfig calldata config, uint128 amount, address collector, bytes calldata collectorData)
        external
        guarded
    {
        if (
            config.receiverAuthorizer == address(0) || config.payer == address(0) || config.receiver == address(0)
                || config.withdrawDelay < MIN_WITHDRAW_DELAY || config.withdrawDelay > MAX_WITHDRAW_DELAY
        ) revert InvalidConfig();
        if (collector != ERC3009_DEPOSIT_COLLECTOR && collector != PERMIT2_DEPOSIT_COLLECTOR) {
            revert InvalidCollector();
        }
        if (amount == 0) revert ZeroAmount();
        bytes32 id = getChannelId(config);
        IERC20Minimal token = IERC20Minimal(config.token);
        uint256 before = token.balanceOf(address(this));
        IDepositCollector(collector).collect(config.payer, config.token, amount, id, collectorData);
        if (token.balanceOf(address(this)) < before + amount) revert DepositShort();
        Channel storage ch = channels[id];
        bool created = ch.balance == 0 && ch.totalClaimed == 0;
        ch.balance += amount;
        if (created) emit ChannelCreated(id, config);
        emit Deposited(id, msg.sender, amount, ch.balance);
    }

    // --- claims and settlement ---

    function claim(VoucherClaim[] calldata voucherClaims) external guarded {
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            ChannelConfig calldata config = voucherClaims[i].voucher.channel;
            if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotAuthorized();
            _claim(voucherClaims[i]);
        }
    }

    function claimWithSignature(VoucherClaim[] calldata voucherClaims, bytes calldata authorizerSignature)
        external
        guarded
    {
        if (voucherClaims.length == 0) return;
        address authorizer = voucherClaims[0].voucher.channel.receiverAuthorizer;
        for (uint256 i = 1; i < voucherClaims.length; i++) {
            if (voucherClaims[i].voucher.channel.receiverAuthorizer != authorizer) revert MixedAuthorizers();
        }
        if (!Signatures.valid(authorizer, getClaimBatchDigest(voucherClaims), authorizerSignature)) {
            revert InvalidAuthorizerSignature();
        }
        for (uint256 i = 0; i < voucherClaims.length; i++) {
            _claim(voucherClaims[i]);
        }
    }

    function _claim(VoucherClaim calldata c) private {
        ChannelConfig calldata config = c.voucher.channel;
        bytes32 id = getChannelId(config);
        bytes32 digest = getVoucherDigest(id, c.voucher.maxClaimableAmount);
        bool signed = config.payerAuthorizer != address(0)
            ? Signatures.recover(digest, c.signature) == config.payerAuthorizer
            : Signatures.valid(config.payer, digest, c.signature);
        if (!signed) revert InvalidVoucherSignature();
        if (c.totalClaimed > c.voucher.maxClaimableAmount) revert ClaimExceedsVoucher();
        Channel storage ch = channels[id];
        if (c.totalClaimed <= ch.totalClaimed) return; // already claimed: superseded, a no-op
        if (c.totalClaimed > ch.balance) revert ClaimExceedsBalance();
        uint128 delta = c.totalClaimed - ch.totalClaimed;
        ch.totalClaimed = c.totalClaimed;
        receivers[config.receiver][config.token].totalClaimed += delta;
        emit Claimed(id, msg.sender, delta, c.totalClaimed);
    }

    function settle(address receiver, address token) external guarded {
        ReceiverTotals storage totals = receivers[receiver][token];
        uint128 amount = totals.totalClaimed - totals.totalSettled;
        totals.totalSettled = totals.totalClaimed;
        if (amount > 0) _send(token, receiver, amount);
        emit Settled(receiver, token, msg.sender, amount);
    }

    // --- refunds and withdrawals ---

    function refund(ChannelConfig calldata config, uint128 amount) external guarded {
        if (msg.sender != config.receiver && msg.sender != config.receiverAuthorizer) revert NotAuthorized();
        _refund(config, getChannelId(config), amount);
    }

    function refundWithSignature(
        ChannelConfig calldata config,
        uint128 amount,
        uint256 nonce,
        bytes calldata receiverAuthorizerSignature
    ) external guarded {
        bytes32 id = getChannelId(config);
        if (nonce != refundNonce[id]) revert InvalidRefundNonce();
        if (!Signatures.valid(config.receiverAuthorizer, getRefundDigest(id, nonce, amount), receiverAuthorizerSignature))
        {
            revert InvalidAuthorizerSignature();
        }
        _refund(config, id, amount);
    }

    function _refund(ChannelConfig calldata config, bytes32 id, uint128 amount) private {
        refundNonce[id] += 1; // first: even a refund that moves nothing spends the nonce
        Channel storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 actual = amount < available ? amount : available;
        if (actual == 0) return;
        ch.balance -= actual;
        Withdrawal storage pending = pendingWithdrawals[id];
        if (pending.amount > 0) {
            if (actual >= pending.amount) delete pendingWithdrawals[id];
            else pending.amount -= actual;
        }
        _send(config.token, config.payer, actual);
        emit Refunded(id, msg.sender, actual);
        if (ch.balance == 0 && ch.totalClaimed == 0) emit ChannelClosed(id, config);
    }

    function initiateWithdraw(ChannelConfig calldata config, uint128 amount) external guarded {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert NotAuthorized();
        bytes32 id = getChannelId(config);
        Channel storage ch = channels[id];
        if (amount == 0) revert ZeroAmount();
        if (amount > ch.balance - ch.totalClaimed) revert WithdrawTooLarge();
        pendingWithdrawals[id] = Withdrawal(amount, uint40(block.timestamp));
        emit WithdrawInitiated(id, amount, uint40(block.timestamp));
    }

    function finalizeWithdraw(ChannelConfig calldata config) external guarded {
        if (msg.sender != config.payer && msg.sender != config.payerAuthorizer) revert NotAuthorized();
        bytes32 id = getChannelId(config);
        Withdrawal memory pending = pendingWithdrawals[id];
        if (pending.amount == 0) revert NoWithdrawal();
        if (block.timestamp < uint256(pending.initiatedAt) + config.withdrawDelay) revert WithdrawDelayNotElapsed();
        delete pendingWithdrawals[id];
        Channel storage ch = channels[id];
        uint128 available = ch.balance - ch.totalClaimed;
        uint128 actual = pending.amount < available ? pending.amount : available;
        ch.balance -= actual;
        if (actual > 0) _send(config.token, config.payer, actual);
        emit Withdrawn(id, actual);
        if (ch.balance == 0 && ch.totalClaimed == 0) emit ChannelClosed(id, config);
    }

    // --- batching ---

    /// @notice Runs each call on this contract in order, all or nothing (a claim and a refund, or
    /// a claim and a settle, in one transaction).
    function multicall(bytes[] calldata data) external returns (bytes[] memory results) {
        results = new bytes[](data.length);
        for (uint256 i = 0; i < data.length; i++) {
            (bool ok, bytes memory answer) = address(this).delegatecall(data[i]);
            if (!ok) {
                assembly {
                    revert(add(answer, 0x20), mload(answer))
                }
            }
            results[i] = answer;
        }
    }

    function _send(address token, address to, uint256 amount) private {
        (bool ok, bytes memory answer) = token.call(abi.encodeCall(IERC20Minimal.transfer, (to, amount)));
        if (!ok || (answer.length > 0 && !abi.decode(answer, (bool)))) revert TransferFailed();
    }
}

/// @title A stand-in for the ERC3009DepositCollector (see X402BatchSettlement): pulls a deposit
/// with the payer's EIP-3009 `receiveWithAuthorization` to this collector (nonce
/// keccak256(abi.encode(channelId, salt)), binding the authorization to its channel), then hands
/// it to the settlement contract. Only the settlement contract may call it.
contract ERC3009DepositCollector is IDepositCollector {
    address public constant SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;

    error OnlySettlement();

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data)
        external
    {
        if (msg.sender != SETTLEMENT) revert OnlySettlement();
        (uint256 validAfter, uint256 validBefore, uint256 salt, bytes memory signature) =
            abi.decode(data, (uint256, uint256, uint256, bytes));
        bytes32 nonce = keccak256(abi.encode(channelId, salt));
        IERC3009Receive(token).receiveWithAuthorization(
            payer, address(this), amount, validAfter, validBefore, nonce, signature
        );
        if (!IERC20Minimal(token).transfer(SETTLEMENT, amount)) revert();
    }
}

/// @title A stand-in for the Permit2DepositCollector (see X402BatchSettlement): pulls a deposit
/// with Permit2's `permitWitnessTransferFrom` (spender: this collector, witness
/// `DepositWitness(bytes32 channelId)`) straight to the settlement contract. The optional EIP-2612
/// segment is not supported here: the payer approves Permit2 first.
contract Permit2DepositCollector is IDepositCollector {
    address public constant SETTLEMENT = 0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003;
    address public constant PERMIT2 = 0x000000000022D473030F116dDEE9F6B43aC78BA3;
    bytes32 private constant WITNESS_TYPEHASH = keccak256("DepositWitness(bytes32 channelId)");
    string private constant WITNESS_TYPE =
        "DepositWitness witness)DepositWitness(bytes32 channelId)TokenPermissions(address token,uint256 amount)";

    error OnlySettlement();

    function collect(address payer, address token, uint256 amount, bytes32 channelId, bytes calldata data)
        external
    {
        if (msg.sender != SETTLEMENT) revert OnlySettlement();
        (uint256 nonce, uint256 deadline, bytes memory signature,) = abi.decode(data, (uint256, uint256, bytes, bytes));
        IPermit2Witness(PERMIT2).permitWitnessTransferFrom(
            IPermit2Witness.PermitTransferFrom(IPermit2Witness.TokenPermissions(token, amount), nonce, deadline),
            IPermit2Witness.SignatureTransferDetails(SETTLEMENT, amount),
            payer,
            keccak256(abi.encode(WITNESS_TYPEHASH, channelId)),
            WITNESS_TYPE,
            signature
        );
    }
}
