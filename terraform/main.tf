################################################################################
# Provider
################################################################################

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

data "aws_caller_identity" "current" {}
data "aws_region" "current" {}
data "aws_partition" "current" {}

################################################################################
# Stages: the vendor profile's levels, declared once in profile.json
################################################################################

locals {
  # scripts/package.py writes profile.json beside the zip from the profile it packages
  # (pipeline/profile.py's Profile.describe() plus the profile's path inside the zip), so
  # the stack and the code follow the same levels. profile_json_path's validation has
  # checked its shape.
  profile = jsondecode(file(var.profile_json_path))

  # name => { child, depth, key }: every per-stage resource iterates this one map with
  # for_each. `depth` is the stage's place in the fan-out (1 = the kickoff's children).
  stages = {
    for stage in local.profile.stages : stage.name => {
      child = stage.child
      depth = stage.depth
      key   = stage.key
    }
  }

  # Stage names in pipeline order (profile.json lists them so), for the kickoff's queue
  # and the dashboard.
  stage_order = [for stage in local.profile.stages : stage.name]
  first_stage = local.stage_order[0]

  # Resource names use hyphens; the stage keys (and HARVEST_STAGE) keep the Python names.
  slug = { for name in keys(local.stages) : name => replace(name, "_", "-") }

  account_id = data.aws_caller_identity.current.account_id
  region     = data.aws_region.current.name
  partition  = data.aws_partition.current.partition

  function_names = {
    kickoff = "${var.name_prefix}-kickoff"
    replay  = "${var.name_prefix}-replay"
    drain   = { for name in keys(local.stages) : name => "${var.name_prefix}-drain-${local.slug[name]}" }
  }
  # Built from the names: a drain's own policy names its function, which depends on it.
  drain_function_arns = {
    for name, function in local.function_names.drain :
    name => "arn:${local.partition}:lambda:${local.region}:${local.account_id}:function:${function}"
  }

  # A received message stays hidden for the whole drain invocation plus a minute, so an
  # invocation that is still working never sees its own messages reappear.
  visibility_timeout = var.drain_timeout + 60

  # The drain dead-letters a message itself when it has been received max_receive_count
  # times; SQS's own redrive (one receive later) only catches drains that crashed.
  sqs_max_receive_count = var.max_receive_count + 1

  drain_schedule = "rate(1 minute)"

  vendor_token_parameter_name = coalesce(var.vendor_token_parameter_name, "/${var.name_prefix}/vendor-token")
  vendor_token_parameter_arn  = "arn:${local.partition}:ssm:${local.region}:${local.account_id}:parameter/${trimprefix(local.vendor_token_parameter_name, "/")}"

  output_bucket_name = coalesce(var.output_bucket_name, "${var.name_prefix}-output-${local.account_id}-${local.region}")
  sink               = "s3://${aws_s3_bucket.output.id}/${var.output_prefix}"

  # The HARVEST_* contract of pipeline/config.py; every function gets exactly these
  # (drains add HARVEST_STAGE).
  function_environment = {
    HARVEST_BACKEND = "aws"
    # Relative to the zip's root, Lambda's working directory (pipeline/profile.py resolves
    # a relative path against the package root too).
    HARVEST_PROFILE                = local.profile.file
    HARVEST_VENDOR_URL             = var.vendor_url
    HARVEST_VENDOR_TOKEN_PARAMETER = local.vendor_token_parameter_name
    HARVEST_RATE_CALLS             = tostring(var.rate_calls)
    HARVEST_RATE_PERIOD            = tostring(var.rate_period)
    HARVEST_QUEUES = jsonencode({
      for name in keys(local.stages) : name => {
        url     = aws_sqs_queue.stage[name].url
        dlq_url = aws_sqs_queue.dlq[name].url
      }
    })
    # The kickoff starts every drain at once; a drain out of time with work left starts
    # its successor (lambda:InvokeFunction, iam.tf). Names, not ARNs: no cycle.
    HARVEST_DRAIN_FUNCTIONS      = jsonencode(local.function_names.drain)
    HARVEST_SINK                 = local.sink
    HARVEST_STATE_TABLE          = aws_dynamodb_table.state.name
    HARVEST_STATE_RETENTION_DAYS = tostring(var.state_retention_days)
    HARVEST_MAX_RECEIVE_COUNT    = tostring(var.max_receive_count)
    HARVEST_CONCURRENCY          = tostring(var.drain_concurrency)
    HARVEST_SAFETY_MARGIN        = tostring(var.drain_safety_margin)
    HARVEST_VISIBILITY_TIMEOUT   = tostring(local.visibility_timeout)
    HARVEST_READ_TIMEOUT         = tostring(var.vendor_read_timeout)
    HARVEST_RETRY_DELAY          = tostring(var.retry_delay)
    HARVEST_WAIT_SECONDS         = tostring(var.receive_wait_seconds)
    HARVEST_ALLOW_HTTP           = tostring(var.allow_insecure_vendor_url)
    HARVEST_MAX_PAGES            = tostring(var.vendor_max_pages)
    HARVEST_MAX_RETRY_AFTER      = tostring(var.vendor_max_retry_after)
    HARVEST_MAX_PAGE_BYTES       = tostring(var.vendor_max_page_bytes)
    POWERTOOLS_SERVICE_NAME      = local.service_name
    POWERTOOLS_METRICS_NAMESPACE = local.metrics_namespace
    POWERTOOLS_LOG_LEVEL         = var.log_level
  }

  # Powertools' service name is the `service` dimension of every metric the functions
  # publish; the alarms and the dashboard select metrics by it.
  service_name      = "harvest"
  metrics_namespace = "Harvest"
}
