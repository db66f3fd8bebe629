################################################################################
# Roles: one per function, assumable by Lambda only
################################################################################

data "aws_iam_policy_document" "assume_lambda" {
  statement {
    sid     = "LambdaAssume"
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["lambda.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "kickoff" {
  name               = local.function_names.kickoff
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
}

resource "aws_iam_role" "replay" {
  name               = local.function_names.replay
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
}

resource "aws_iam_role" "drain" {
  for_each = local.stages

  name               = local.function_names.drain[each.key]
  assume_role_policy = data.aws_iam_policy_document.assume_lambda.json
}

################################################################################
# Shared building blocks
################################################################################

# X-Ray's PutTraceSegments and PutTelemetryRecords have no resource-level permissions:
# "*" is the only resource they accept. This is the one wildcard in the stack.
data "aws_iam_policy_document" "xray" {
  statement {
    sid       = "XRayWrite"
    actions   = ["xray:PutTraceSegments", "xray:PutTelemetryRecords"]
    resources = ["*"]
  }
}

# The state table holds the run ledger and the shared rate budget; the functions that call
# the vendor (kickoff and drains) use both: GetItem/UpdateItem for the budget and the
# ledger's run items and conditional states, BatchWriteItem for listings and final states
# (25 a request), BatchGetItem to skip what is done, Query for a run's status. Nothing
# deletes items.
data "aws_iam_policy_document" "state_table" {
  statement {
    sid = "StateTable"
    actions = [
      "dynamodb:GetItem",
      "dynamodb:BatchGetItem",
      "dynamodb:BatchWriteItem",
      "dynamodb:UpdateItem",
      "dynamodb:Query",
    ]
    resources = [aws_dynamodb_table.state.arn]
  }
}

# Whichever function settles a run writes its manifest, counting the run's data files
# first; the last stage's drains write the data. Only under the sink prefix.
data "aws_iam_policy_document" "sink" {
  statement {
    sid       = "WriteSink"
    actions   = ["s3:PutObject"]
    resources = ["${aws_s3_bucket.output.arn}/${var.output_prefix}/*"]
  }

  statement {
    sid       = "ListSink"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.output.arn]

    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["${var.output_prefix}/*"]
    }
  }
}

# The functions that call the vendor read its token at run time.
data "aws_iam_policy_document" "vendor_token" {
  statement {
    sid       = "VendorToken"
    actions   = ["ssm:GetParameter"]
    resources = [local.vendor_token_parameter_arn]
  }

  dynamic "statement" {
    for_each = var.vendor_token_kms_key_arn == null ? [] : [var.vendor_token_kms_key_arn]

    content {
      sid       = "VendorTokenDecrypt"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]

      condition {
        test     = "StringEquals"
        variable = "kms:ViaService"
        values   = ["ssm.${local.region}.amazonaws.com"]
      }
    }
  }
}

################################################################################
# Kickoff: enqueue the first stage's entities
################################################################################

data "aws_iam_policy_document" "kickoff" {
  source_policy_documents = [
    data.aws_iam_policy_document.xray.json,
    data.aws_iam_policy_document.state_table.json,
    data.aws_iam_policy_document.vendor_token.json,
    # A window whose first listing is empty settles at once, in the kickoff.
    data.aws_iam_policy_document.sink.json,
  ]

  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.kickoff.arn}:*"]
  }

  statement {
    sid       = "EnqueueFirstStage"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.stage[local.first_stage].arn]
  }

  # The drains start with the kickoff, not at their next scheduled minute.
  statement {
    sid       = "StartDrains"
    actions   = ["lambda:InvokeFunction"]
    resources = values(local.drain_function_arns)
  }
}

resource "aws_iam_role_policy" "kickoff" {
  name   = "harvest"
  role   = aws_iam_role.kickoff.id
  policy = data.aws_iam_policy_document.kickoff.json
}

################################################################################
# Drains: consume the own queue, feed the child queue, dead-letter to the own DLQ
################################################################################

data "aws_iam_policy_document" "drain" {
  for_each = local.stages

  source_policy_documents = [
    data.aws_iam_policy_document.xray.json,
    data.aws_iam_policy_document.state_table.json,
    data.aws_iam_policy_document.vendor_token.json,
    data.aws_iam_policy_document.sink.json,
  ]

  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.drain[each.key].arn}:*"]
  }

  statement {
    sid = "ConsumeOwnQueue"
    actions = [
      "sqs:ReceiveMessage",
      "sqs:DeleteMessage",
      "sqs:ChangeMessageVisibility",
    ]
    resources = [aws_sqs_queue.stage[each.key].arn]
  }

  # Whether a stage queue still holds work decides if an empty queue means "done" (the
  # stages above) and whether a run the ledger shows unsettled has a message left
  # anywhere (every stage).
  statement {
    sid       = "WatchStageQueues"
    actions   = ["sqs:GetQueueAttributes"]
    resources = [for name in keys(local.stages) : aws_sqs_queue.stage[name].arn]
  }

  statement {
    sid       = "DeadLetterOwnQueue"
    actions   = ["sqs:SendMessage"]
    resources = [aws_sqs_queue.dlq[each.key].arn]
  }

  # Out of time with work left, a drain starts its own successor at once.
  statement {
    sid       = "StartSuccessor"
    actions   = ["lambda:InvokeFunction"]
    resources = [local.drain_function_arns[each.key]]
  }

  dynamic "statement" {
    for_each = each.value.child == null ? [] : [each.value.child]

    content {
      sid       = "FeedChildQueue"
      actions   = ["sqs:SendMessage"]
      resources = [aws_sqs_queue.stage[statement.value].arn]
    }
  }
}

resource "aws_iam_role_policy" "drain" {
  for_each = local.stages

  name   = "harvest"
  role   = aws_iam_role.drain[each.key].id
  policy = data.aws_iam_policy_document.drain[each.key].json
}

################################################################################
# Replay: DLQs back to their stage queues
################################################################################

# No state table, no token: a replay only moves messages.
data "aws_iam_policy_document" "replay" {
  source_policy_documents = [
    data.aws_iam_policy_document.xray.json,
  ]

  statement {
    sid       = "OwnLogs"
    actions   = ["logs:CreateLogStream", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.replay.arn}:*"]
  }

  # A dry run receives the dead letters to count them and releases them at once
  # (ChangeMessageVisibility to 0); a replay deletes each once it is requeued.
  statement {
    sid       = "ConsumeDeadLetterQueues"
    actions   = ["sqs:ReceiveMessage", "sqs:ChangeMessageVisibility", "sqs:DeleteMessage"]
    resources = [for name in keys(local.stages) : aws_sqs_queue.dlq[name].arn]
  }

  statement {
    sid       = "RequeueToStageQueues"
    actions   = ["sqs:SendMessage"]
    resources = [for name in keys(local.stages) : aws_sqs_queue.stage[name].arn]
  }
}

resource "aws_iam_role_policy" "replay" {
  name   = "harvest"
  role   = aws_iam_role.replay.id
  policy = data.aws_iam_policy_document.replay.json
}
