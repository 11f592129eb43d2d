"""Model servers behind the gateway (the deterministic fake lives here; the manager will too)."""
