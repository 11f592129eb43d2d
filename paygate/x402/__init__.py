"""x402 payments, free of HTTP: the wire models and header codec, networks, the schemes
(their registry), offers, local verification, pricing and metering, the payment policy
(processor) and its settlers (facilitator, chain) with the chain reader, sign-in with x, smart
wallets, and the ledger (a sans-IO rules core, ledger_rules; ledger_base; the SQLite and
PostgreSQL stores). The gateway's HTTP side of payments is ``paygate.server.payments``."""
