"""Throw-away local chain components for the demo and the tests; nothing here is used in
production serving.

- :class:`Anvil` / :func:`start_anvil`: a local EVM (npm anvil) with chain id 84532, Circle's
  FiatToken V2.2 at Base Sepolia's USDC address and Uniswap's Permit2 at its canonical address
  (both from npm: ``registry``), our stand-ins for the x402UptoPermit2Proxy and Multicall3.
- :class:`~paygate_dev.chain.smart_account.SmartAccount`: a smart-wallet payer (Solady's
  ERC-4337 account), deployed or counterfactual, signing as such wallets do.
- :class:`FacilitatorServer` (in-process thread) and :class:`FacilitatorProcess` (child process):
  a real x402 facilitator (the official SDK) over HTTP on loopback, with switchable faults.
- :func:`sign_v2_payment` / :func:`sign_v1_payment`: payments signed by the SDK's paying client.

The facilitator and payer parts need the x402 SDK (the ``dev`` extra). Every name is imported on
first use, so ``import paygate_dev.chain`` is cheap and needs neither web3 nor the SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from paygate_dev.chain.constants import (
    CHAIN_ID,
    MULTICALL3_ADDRESS,
    NETWORK,
    NETWORK_V1,
    PERMIT2_ADDRESS,
    UPTO_PROXY_ADDRESS,
    USDC_ADDRESS,
    USDC_DECIMALS,
    USDC_NAME,
    USDC_VERSION,
)

if TYPE_CHECKING:
    from paygate_dev.chain.accounts import DevAccount, dev_accounts, new_account
    from paygate_dev.chain.anvil import Anvil, AnvilError, start_anvil
    from paygate_dev.chain.facilitator import FacilitatorServer, FacilitatorSettings
    from paygate_dev.chain.facilitator_process import FacilitatorProcess
    from paygate_dev.chain.faults import FacilitatorStats, Fault, FaultControls
    from paygate_dev.chain.payer import (
        encode_header,
        facilitator_request,
        requirements_v1,
        requirements_v2,
        sign_v1_payment,
        sign_v2_payment,
    )

# Imported on first use: web3 and the x402 SDK take a second or two to import.
_LAZY = {
    "DevAccount": "paygate_dev.chain.accounts",
    "dev_accounts": "paygate_dev.chain.accounts",
    "new_account": "paygate_dev.chain.accounts",
    "Anvil": "paygate_dev.chain.anvil",
    "AnvilError": "paygate_dev.chain.anvil",
    "start_anvil": "paygate_dev.chain.anvil",
    "FacilitatorServer": "paygate_dev.chain.facilitator",
    "FacilitatorSettings": "paygate_dev.chain.facilitator",
    "FacilitatorProcess": "paygate_dev.chain.facilitator_process",
    "FacilitatorStats": "paygate_dev.chain.faults",
    "Fault": "paygate_dev.chain.faults",
    "FaultControls": "paygate_dev.chain.faults",
    "encode_header": "paygate_dev.chain.payer",
    "facilitator_request": "paygate_dev.chain.payer",
    "requirements_v1": "paygate_dev.chain.payer",
    "requirements_v2": "paygate_dev.chain.payer",
    "sign_v1_payment": "paygate_dev.chain.payer",
    "sign_v2_payment": "paygate_dev.chain.payer",
}

__all__ = [
    "CHAIN_ID",
    "MULTICALL3_ADDRESS",
    "NETWORK",
    "NETWORK_V1",
    "PERMIT2_ADDRESS",
    "UPTO_PROXY_ADDRESS",
    "USDC_ADDRESS",
    "USDC_DECIMALS",
    "USDC_NAME",
    "USDC_VERSION",
    "Anvil",
    "AnvilError",
    "DevAccount",
    "FacilitatorProcess",
    "FacilitatorServer",
    "FacilitatorSettings",
    "FacilitatorStats",
    "Fault",
    "FaultControls",
    "dev_accounts",
    "encode_header",
    "facilitator_request",
    "new_account",
    "requirements_v1",
    "requirements_v2",
    "sign_v1_payment",
    "sign_v2_payment",
    "start_anvil",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
