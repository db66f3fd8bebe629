"""Items of the state table expire: every ledger and budget write sets `expires_at`.

The table's TTL attribute (terraform/storage.tf) is `expires_at`, epoch seconds; DynamoDB
deletes an item some time after it has passed. Each UpdateItem of the ledger and the budget
sets it to the write's time plus the retention (HARVEST_STATE_RETENTION_DAYS, 35 days), so
an item lives that long after its last change: a run's records about that long after it
settled, the budget's item that long after the last call.
"""

from __future__ import annotations

from typing import Any

EXPIRES_AT = "expires_at"
DAY = 86400.0


def expiring(update: dict[str, Any], expires_at: float) -> dict[str, Any]:
    """The UpdateItem arguments `update`, also setting the item's expires_at."""
    expression = update["UpdateExpression"]
    setting = "#expires_at = :expires_at"
    if expression.startswith("SET "):
        expression = f"SET {setting}, {expression[len('SET ') :]}"
    else:  # only ADD or REMOVE clauses
        expression = f"SET {setting} {expression}"
    return {
        **update,
        "UpdateExpression": expression,
        "ExpressionAttributeNames": {
            **update.get("ExpressionAttributeNames", {}),
            "#expires_at": EXPIRES_AT,
        },
        "ExpressionAttributeValues": {
            **update.get("ExpressionAttributeValues", {}),
            ":expires_at": {"N": str(int(expires_at))},
        },
    }
