"""The vendor API's client: one Session, the contract's error table, retries, latency."""
