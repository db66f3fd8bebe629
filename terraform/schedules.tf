################################################################################
# Kickoff schedule (daily; an empty event means "the previous UTC day")
################################################################################

resource "aws_cloudwatch_event_rule" "kickoff" {
  name                = local.function_names.kickoff
  description         = "Start the daily harvest"
  schedule_expression = var.kickoff_schedule
  state               = var.schedules_enabled ? "ENABLED" : "DISABLED"
}

resource "aws_cloudwatch_event_target" "kickoff" {
  rule      = aws_cloudwatch_event_rule.kickoff.name
  target_id = "kickoff"
  arn       = aws_lambda_function.kickoff.arn
  input     = jsonencode({})
}

resource "aws_lambda_permission" "kickoff" {
  statement_id  = "AllowEventBridgeSchedule"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.kickoff.function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.kickoff.arn
}

################################################################################
# Drain schedules (every minute, per stage)
################################################################################

resource "aws_cloudwatch_event_rule" "drain" {
  for_each = local.stages

  name                = local.function_names.drain[each.key]
  description         = "Drain the ${each.key} queue every minute"
  schedule_expression = local.drain_schedule
  state               = var.schedules_enabled ? "ENABLED" : "DISABLED"
}

resource "aws_cloudwatch_event_target" "drain" {
  for_each = local.stages

  rule      = aws_cloudwatch_event_rule.drain[each.key].name
  target_id = "drain"
  arn       = aws_lambda_function.drain[each.key].arn
  input     = jsonencode({})
}

resource "aws_lambda_permission" "drain" {
  for_each = local.stages

  statement_id  = "AllowEventBridgeSchedule"
  action        = "lambda:InvokeFunction"
  function_name = aws_lambda_function.drain[each.key].function_name
  principal     = "events.amazonaws.com"
  source_arn    = aws_cloudwatch_event_rule.drain[each.key].arn
}
