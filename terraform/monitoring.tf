################################################################################
# Alarm topic, encrypted with its own key
################################################################################

# CloudWatch alarms cannot publish to a topic encrypted with the AWS managed aws/sns key
# (its key policy does not admit cloudwatch.amazonaws.com), so the topic gets a
# customer managed key that does.
data "aws_iam_policy_document" "alarms_key" {
  # A key policy's "*" resource means "this key", and the account must keep kms:* on it.
  # checkov:skip=CKV_AWS_109:Key policy: "*" is the key itself, administered by the account
  # checkov:skip=CKV_AWS_111:Key policy: "*" is the key itself, written to only by CloudWatch
  # checkov:skip=CKV_AWS_356:Key policy: a key policy cannot name its own not-yet-created ARN
  statement {
    sid       = "AccountAdministersKey"
    actions   = ["kms:*"]
    resources = ["*"]

    principals {
      type        = "AWS"
      identifiers = ["arn:${local.partition}:iam::${local.account_id}:root"]
    }
  }

  statement {
    sid       = "CloudWatchAlarmsPublish"
    actions   = ["kms:Decrypt", "kms:GenerateDataKey*"]
    resources = ["*"]

    principals {
      type        = "Service"
      identifiers = ["cloudwatch.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_kms_key" "alarms" {
  description             = "${var.name_prefix} alarm topic"
  enable_key_rotation     = true
  deletion_window_in_days = 7
  policy                  = data.aws_iam_policy_document.alarms_key.json
}

resource "aws_kms_alias" "alarms" {
  name          = "alias/${var.name_prefix}-alarms"
  target_key_id = aws_kms_key.alarms.key_id
}

resource "aws_sns_topic" "alarms" {
  name              = "${var.name_prefix}-alarms"
  kms_master_key_id = aws_kms_key.alarms.arn
}

resource "aws_sns_topic_subscription" "alarm_email" {
  count = var.alarm_email == null ? 0 : 1

  topic_arn = aws_sns_topic.alarms.arn
  protocol  = "email"
  endpoint  = var.alarm_email
}

################################################################################
# Alarms per stage
################################################################################

resource "aws_cloudwatch_metric_alarm" "dlq_not_empty" {
  for_each = local.stages

  alarm_name          = "${var.name_prefix}-${local.slug[each.key]}-dlq-not-empty"
  alarm_description   = "Messages were dead-lettered in the ${each.key} stage: inspect, then replay."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateNumberOfMessagesVisible"
  dimensions          = { QueueName = aws_sqs_queue.dlq[each.key].name }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "oldest_message" {
  for_each = local.stages

  alarm_name          = "${var.name_prefix}-${local.slug[each.key]}-oldest-message"
  alarm_description   = "The ${each.key} queue has held a message for over ${var.oldest_message_alarm_seconds} s: its drain is stuck or starved."
  namespace           = "AWS/SQS"
  metric_name         = "ApproximateAgeOfOldestMessage"
  dimensions          = { QueueName = aws_sqs_queue.stage[each.key].name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.oldest_message_alarm_seconds
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

resource "aws_cloudwatch_metric_alarm" "drain_errors" {
  for_each = local.stages

  alarm_name          = "${var.name_prefix}-${local.slug[each.key]}-drain-errors"
  alarm_description   = "The ${each.key} drain function failed (crash, timeout or bad configuration)."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.drain[each.key].function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

# The kickoff is not retried (functions.tf): its failure must reach a person.
resource "aws_cloudwatch_metric_alarm" "kickoff_errors" {
  alarm_name          = "${var.name_prefix}-kickoff-errors"
  alarm_description   = "The kickoff failed: no harvest was started. Rerun it with an explicit window."
  namespace           = "AWS/Lambda"
  metric_name         = "Errors"
  dimensions          = { FunctionName = aws_lambda_function.kickoff.function_name }
  statistic           = "Sum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = 0
  treat_missing_data  = "notBreaching"
  alarm_actions       = [aws_sns_topic.alarms.arn]
  ok_actions          = [aws_sns_topic.alarms.arn]
}

################################################################################
# Alarm on the whole pipeline: a run that does not settle
################################################################################

# Queue alarms see one stage at a time; a run can also stall between them (a drain that
# keeps failing its batches, a token outage that leaves messages queued). Every drain
# invocation publishes the age of the oldest run that has not settled (0 when none).
resource "aws_cloudwatch_metric_alarm" "run_not_settled" {
  alarm_name          = "${var.name_prefix}-run-not-settled"
  alarm_description   = "A harvest run has not settled ${var.run_settle_alarm_seconds} s after its kickoff: check the queues, the DLQs and the drain errors."
  namespace           = local.metrics_namespace
  metric_name         = "OldestUnsettledRunAge"
  dimensions          = { service = local.service_name }
  statistic           = "Maximum"
  period              = 300
  evaluation_periods  = 1
  comparison_operator = "GreaterThanThreshold"
  threshold           = var.run_settle_alarm_seconds
  # No data means no drain ran: the drains' own alarms and the queue alarms cover that.
  treat_missing_data = "notBreaching"
  alarm_actions      = [aws_sns_topic.alarms.arn]
  ok_actions         = [aws_sns_topic.alarms.arn]
}

################################################################################
# Dashboard: queue depth per stage, vendor calls per minute against the limit, run age
################################################################################

locals {
  dashboard_name = var.name_prefix

  queue_widgets = [
    for i, name in local.stage_order : {
      type   = "metric"
      x      = (i % 2) * 12
      y      = floor(i / 2) * 6
      width  = 12
      height = 6
      properties = {
        title   = "Queue depth: ${name}"
        region  = local.region
        view    = "timeSeries"
        stacked = true
        stat    = "Maximum"
        period  = 60
        metrics = [
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.stage[name].name, { label = "waiting" }],
          ["AWS/SQS", "ApproximateNumberOfMessagesNotVisible", "QueueName", aws_sqs_queue.stage[name].name, { label = "in flight" }],
          ["AWS/SQS", "ApproximateNumberOfMessagesVisible", "QueueName", aws_sqs_queue.dlq[name].name, { label = "dead-lettered" }],
        ]
        yAxis = { left = { min = 0 } }
      }
    }
  ]

  # A drain's metrics carry its stage as a second dimension, the kickoff's only the
  # service: the vendor calls line sums every series (hidden, by id).
  vendor_call_series = merge(
    { kickoff = [local.metrics_namespace, "VendorCalls", "service", local.service_name] },
    { for name in local.stage_order : "drain_${name}" => [local.metrics_namespace, "VendorCalls", "service", local.service_name, "stage", name] },
  )

  vendor_calls_widget = {
    type   = "metric"
    x      = (length(local.stage_order) % 2) * 12
    y      = floor(length(local.stage_order) / 2) * 6
    width  = 12
    height = 6
    properties = {
      title   = "Vendor calls per minute"
      region  = local.region
      view    = "timeSeries"
      stacked = false
      stat    = "Sum"
      period  = 60
      metrics = concat(
        [[{ expression = "SUM([${join(", ", keys(local.vendor_call_series))}])", label = "calls/min", id = "calls" }]],
        [for id, metric in local.vendor_call_series : concat(metric, [{ id = id, visible = false }])],
      )
      annotations = {
        horizontal = [
          { label = "rate limit", value = var.rate_calls * 60 / var.rate_period },
        ]
      }
      yAxis = { left = { min = 0 } }
    }
  }

  run_age_widget = {
    type   = "metric"
    x      = ((length(local.stage_order) + 1) % 2) * 12
    y      = floor((length(local.stage_order) + 1) / 2) * 6
    width  = 12
    height = 6
    properties = {
      title   = "Oldest unsettled run (seconds since kickoff)"
      region  = local.region
      view    = "timeSeries"
      stacked = false
      stat    = "Maximum"
      period  = 300
      metrics = [
        [local.metrics_namespace, "OldestUnsettledRunAge", "service", local.service_name, { label = "age" }],
      ]
      annotations = {
        horizontal = [
          { label = "alarm", value = var.run_settle_alarm_seconds },
        ]
      }
      yAxis = { left = { min = 0 } }
    }
  }
}

resource "aws_cloudwatch_dashboard" "this" {
  count = var.enable_dashboard ? 1 : 0

  dashboard_name = local.dashboard_name
  dashboard_body = jsonencode({ widgets = concat(local.queue_widgets, [local.vendor_calls_widget, local.run_age_widget]) })
}
