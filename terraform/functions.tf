################################################################################
# Log groups (created before the functions so Lambda never creates them unmanaged)
################################################################################

resource "aws_cloudwatch_log_group" "kickoff" {
  name              = "/aws/lambda/${local.function_names.kickoff}"
  retention_in_days = var.log_retention_days
}

resource "aws_cloudwatch_log_group" "replay" {
  name              = "/aws/lambda/${local.function_names.replay}"
  retention_in_days = var.log_retention_days
}

resource "aws_cloudwatch_log_group" "drain" {
  for_each = local.stages

  name              = "/aws/lambda/${local.function_names.drain[each.key]}"
  retention_in_days = var.log_retention_days
}

################################################################################
# Kickoff: lists the first level's entities of a window and enqueues them
################################################################################

resource "aws_lambda_function" "kickoff" {
  function_name = local.function_names.kickoff
  description   = "harvest kickoff: list a time window's ${local.first_stage} and enqueue them (scheduled: previous UTC day)"
  role          = aws_iam_role.kickoff.arn
  handler       = "workers.kickoff.handler"
  runtime       = "python3.12"
  architectures = ["x86_64"] # scripts/package.py installs manylinux2014_x86_64 wheels

  filename         = var.lambda_zip_path
  source_code_hash = filebase64sha256(var.lambda_zip_path)

  timeout = var.kickoff_timeout
  # Lambda's CPU share follows memory: at 256 MB (0.145 vCPU) the kickoff took 2.7-3.1 s
  # to build its clients, list the troops and start the drains, which every stage waits
  # for; at 1024 MB 0.9-1.2 s (docs/benchmarks.md), for well under a cent a year.
  memory_size                    = 1024
  reserved_concurrent_executions = 1

  environment {
    variables = local.function_environment
  }

  tracing_config {
    mode = "Active"
  }

  depends_on = [aws_cloudwatch_log_group.kickoff, aws_iam_role_policy.kickoff]
}

################################################################################
# Drains: one per stage, each started every minute
################################################################################

resource "aws_lambda_function" "drain" {
  for_each = local.stages

  function_name = local.function_names.drain[each.key]
  description   = "harvest drain of the ${each.key} queue"
  role          = aws_iam_role.drain[each.key].arn
  handler       = "workers.drain.handler"
  runtime       = "python3.12"
  architectures = ["x86_64"]

  filename         = var.lambda_zip_path
  source_code_hash = filebase64sha256(var.lambda_zip_path)

  timeout     = var.drain_timeout
  memory_size = var.drain_memory
  # Two overlapping invocations per stage: the next minute's run starts while the last
  # one finishes, and both draw on the one DynamoDB rate budget.
  reserved_concurrent_executions = var.drain_reserved_concurrency

  environment {
    variables = merge(local.function_environment, { HARVEST_STAGE = each.key })
  }

  tracing_config {
    mode = "Active"
  }

  lifecycle {
    # profile_json_path's validation bounds stage names to 24 characters, name_prefix's to
    # 24: 55 at most. Checked here too, where the name is made.
    precondition {
      condition     = length(local.function_names.drain[each.key]) <= 64
      error_message = "Drain function name ${local.function_names.drain[each.key]} is longer than Lambda's 64 characters: shorten name_prefix or the stage name."
    }

    precondition {
      condition     = var.drain_safety_margin < var.drain_timeout
      error_message = "drain_safety_margin must be smaller than drain_timeout."
    }
  }

  depends_on = [aws_cloudwatch_log_group.drain, aws_iam_role_policy.drain]
}

# A scheduled drain is never retried: the next minute's run picks up the same messages,
# and a throttled event older than a minute is stale. The same holds for a drain the
# kickoff or a predecessor started (pipeline/runtime.py): Lambda retries it while it is
# throttled, until it is a minute old.
resource "aws_lambda_function_event_invoke_config" "drain" {
  for_each = local.stages

  function_name                = aws_lambda_function.drain[each.key].function_name
  maximum_retry_attempts       = 0
  maximum_event_age_in_seconds = 60
}

# A failed kickoff raises an alarm and is rerun by hand with an explicit window, rather
# than retried blindly.
resource "aws_lambda_function_event_invoke_config" "kickoff" {
  function_name          = aws_lambda_function.kickoff.function_name
  maximum_retry_attempts = 0
}

################################################################################
# Replay: moves a stage's dead-lettered messages back to its queue (invoked by hand)
################################################################################

resource "aws_lambda_function" "replay" {
  function_name = local.function_names.replay
  description   = "harvest replay: move messages from a stage DLQ back to its queue"
  role          = aws_iam_role.replay.arn
  handler       = "workers.replay.handler"
  runtime       = "python3.12"
  architectures = ["x86_64"]

  filename         = var.lambda_zip_path
  source_code_hash = filebase64sha256(var.lambda_zip_path)

  timeout                        = var.replay_timeout
  memory_size                    = 256
  reserved_concurrent_executions = 1

  environment {
    variables = local.function_environment
  }

  tracing_config {
    mode = "Active"
  }

  depends_on = [aws_cloudwatch_log_group.replay, aws_iam_role_policy.replay]
}
