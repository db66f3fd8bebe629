"""harvest: rate-limited harvesting of a nested vendor API with queue-drain workers.

The core lives here (interfaces, stages, envelope, drain, kickoff, completion, replay,
runtime); `vendor_api/` is the vendor's client; `aws/` and `local/` implement the
interfaces on AWS and on one machine; `dev/` holds what only people at a terminal use.
The README's Layout section says which way imports run; tests/test_layout.py keeps it.
"""
