################################################################################
# Stage queues and their dead-letter queues
################################################################################

resource "aws_sqs_queue" "dlq" {
  for_each = local.stages

  name                      = "${var.name_prefix}-${local.slug[each.key]}-dlq"
  message_retention_seconds = 1209600 # 14 days, the SQS maximum: time to look and replay
  sqs_managed_sse_enabled   = true
}

resource "aws_sqs_queue" "stage" {
  for_each = local.stages

  name                       = "${var.name_prefix}-${local.slug[each.key]}"
  visibility_timeout_seconds = local.visibility_timeout
  message_retention_seconds  = var.queue_retention_seconds
  sqs_managed_sse_enabled    = true

  lifecycle {
    precondition {
      condition     = local.visibility_timeout > var.drain_timeout
      error_message = "The queue visibility timeout must exceed the drain timeout, or messages reappear while a drain still holds them."
    }
  }
}

# The redrive policy is its own resource (as terraform-aws-sqs does it) so a queue and its
# DLQ are created side by side instead of one after the other.
resource "aws_sqs_queue_redrive_policy" "stage" {
  for_each = local.stages

  queue_url = aws_sqs_queue.stage[each.key].id

  redrive_policy = jsonencode({
    deadLetterTargetArn = aws_sqs_queue.dlq[each.key].arn
    maxReceiveCount     = local.sqs_max_receive_count
  })
}

# Only the stage's own queue may redrive into its DLQ (and the console's "redrive back"
# knows where to send messages).
resource "aws_sqs_queue_redrive_allow_policy" "dlq" {
  for_each = var.enable_redrive_allow_policy ? local.stages : {}

  queue_url = aws_sqs_queue.dlq[each.key].id

  redrive_allow_policy = jsonencode({
    redrivePermission = "byQueue"
    sourceQueueArns   = [aws_sqs_queue.stage[each.key].arn]
  })
}
