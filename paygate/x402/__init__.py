"""x402 payments: models, header codec, networks, local verification, facilitator and chain
settlers, ledger, and the gateway's payment gate."""
