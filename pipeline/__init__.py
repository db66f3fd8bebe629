"""harvest: rate-limited harvesting of a nested vendor API with queue-drain workers."""
