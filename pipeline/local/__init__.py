"""One machine: the scheduler that plays EventBridge and Lambda for `harvest local`."""
