"""The host's half of the protocol: see docs/transaction.md."""
