"""x402 payments, free of HTTP: the wire models and header codec, networks, the schemes (the
registry and one package per scheme), offers, local verification, pricing and metering,
admission (processor), a paid request's payment after it (session), settling (settlements,
settlement strategies), recovery, the facilitator and chain settlers with the chain reader,
sign-in with x, smart wallets, and the ledger (a sans-IO rules core, ledger_rules; ledger_base;
the SQLite and PostgreSQL stores). The gateway's HTTP side of payments is
``paygate.server.payments``."""
