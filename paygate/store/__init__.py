"""paygate's persistent operator state (named deployments)."""
