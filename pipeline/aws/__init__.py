"""AWS: the queue, ledger, budget and sink interfaces on SQS, DynamoDB and S3; the token in SSM."""
