"""The operator console: a server-rendered web UI on its own listener (``console_listen``),
never on the gateway's public port. See docs/CONSOLE.md."""
