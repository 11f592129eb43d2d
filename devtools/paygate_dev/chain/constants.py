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
