"""x402 payments: models, header codec, networks, schemes (the registry and one module per
scheme), local verification, pricing and metering, admission (processor), a paid request's
payment after it (session), settling (settlements, settlement strategies), recovery, the
facilitator and chain settlers and the chain reader, and the ledger. The HTTP side of the
gateway's payment step is ``paygate.server.payments``."""
