################################################################################
# Profile
################################################################################

output "profile" {
  description = "The vendor profile deployed (from profile_json_path): its name, its file in the zip (HARVEST_PROFILE) and its stages in order."
  value = {
    name   = local.profile.name
    file   = local.profile.file
    stages = local.stage_order
  }
}

################################################################################
# Queues
################################################################################

output "queue_urls" {
  description = "Stage queue URL per stage."
  value       = { for name in keys(local.stages) : name => aws_sqs_queue.stage[name].url }
}

output "queue_arns" {
  description = "Stage queue ARN per stage."
  value       = { for name in keys(local.stages) : name => aws_sqs_queue.stage[name].arn }
}

output "dlq_urls" {
  description = "Dead-letter queue URL per stage."
  value       = { for name in keys(local.stages) : name => aws_sqs_queue.dlq[name].url }
}

output "dlq_arns" {
  description = "Dead-letter queue ARN per stage."
  value       = { for name in keys(local.stages) : name => aws_sqs_queue.dlq[name].arn }
}

################################################################################
# Functions
################################################################################

output "kickoff_function_name" {
  description = "Function that starts a harvest (aws lambda invoke --payload '{\"from\": ..., \"to\": ...}')."
  value       = aws_lambda_function.kickoff.function_name
}

output "replay_function_name" {
  description = "Function that moves a stage's DLQ back to its queue (payload {\"stage\": ..., \"max\": N})."
  value       = aws_lambda_function.replay.function_name
}

output "drain_function_names" {
  description = "Drain function name per stage."
  value       = { for name in keys(local.stages) : name => aws_lambda_function.drain[name].function_name }
}

################################################################################
# Storage and monitoring
################################################################################

output "bucket_name" {
  description = "Output bucket the last stage's drains write to."
  value       = aws_s3_bucket.output.id
}

output "sink" {
  description = "HARVEST_SINK of the functions (s3://bucket/prefix)."
  value       = local.sink
}

output "state_table_name" {
  description = "DynamoDB table of the run ledger and the rate budget."
  value       = aws_dynamodb_table.state.name
}

output "vendor_token_parameter_name" {
  description = "SSM parameter holding the vendor token (the name only; the token is never output)."
  value       = local.vendor_token_parameter_name
}

output "alarm_topic_arn" {
  description = "SNS topic the alarms publish to."
  value       = aws_sns_topic.alarms.arn
}

output "dashboard_name" {
  description = "CloudWatch dashboard name (null when enable_dashboard is false)."
  value       = one(aws_cloudwatch_dashboard.this[*].dashboard_name)
}

################################################################################
# Analytics
################################################################################

output "glue_database_name" {
  description = "Glue database holding the points table (Athena: SELECT ... FROM <database>.points)."
  value       = aws_glue_catalog_database.analytics.name
}

output "points_table_name" {
  description = "Glue table over the compacted Parquet layer (partition projection on dt)."
  value       = aws_glue_catalog_table.points.name
}

output "points_location" {
  description = "S3 prefix of the compacted Parquet layer (what `harvest compact --aws` writes)."
  value       = local.points_location
}

output "athena_workgroup_name" {
  description = "Athena workgroup to query the points table with (results encrypted, configuration enforced)."
  value       = aws_athena_workgroup.analytics.name
}
