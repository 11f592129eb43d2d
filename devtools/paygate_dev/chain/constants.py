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
