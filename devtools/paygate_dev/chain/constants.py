"""Chain facts the dev chain reproduces (Base Sepolia), importable without web3."""

from __future__ import annotations

CHAIN_ID = 84532
NETWORK = "eip155:84532"  # x402 v2 (CAIP-2)
NETWORK_V1 = "base-sepolia"  # x402 v1 name of the same chain
USDC_ADDRESS = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"  # USDC on Base Sepolia (checksummed)
MULTICALL3_ADDRESS = "0xcA11bde05977b3631167028862bE2a173976CA11"  # the same on every chain
USDC_NAME = "USDC"  # EIP-712 domain name of USDC on Base Sepolia
USDC_VERSION = "2"
USDC_DECIMALS = 6
# x402 `upto` (EVM): Permit2 and the x402UptoPermit2Proxy at their canonical addresses (the
# x402 SDK's constants); our stand-ins are placed there by Anvil.install_usdc.
PERMIT2_ADDRESS = "0x000000000022D473030F116dDEE9F6B43aC78BA3"
UPTO_PROXY_ADDRESS = "0x4020A4f3b7b90ccA423B9fabCc0CE57C6C240002"
# x402 `batch-settlement` (EVM): the settlement contract and its two deposit collectors at their
# canonical CREATE2 addresses (the SDK's constants); our stand-ins are placed there too.
BATCH_SETTLEMENT_ADDRESS = "0x4020074e9dF2ce1deE5A9C1b5c3f541D02a10003"
ERC3009_DEPOSIT_COLLECTOR_ADDRESS = "0x4020806089470a89826cB9fB1f4059150b550004"
PERMIT2_DEPOSIT_COLLECTOR_ADDRESS = "0x4020425FAf3B746C082C2f942b4E5159887B0005"
