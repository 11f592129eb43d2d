"""x402 payments: models, header codec, networks, schemes (the registry and one module per
scheme), local verification, pricing and metering, the payment policy (processor), settlement
strategies, the facilitator and chain settlers and the chain reader, and the ledger. The HTTP
side of the gateway's payment step is ``paygate.server.payments``."""
