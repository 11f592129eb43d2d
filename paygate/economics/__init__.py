"""The economics controls: token limits and budgets shared through the ledger (every worker and
replica sees the same counts), shadow mode, and webhook alerts. See docs/CONSOLE.md."""
