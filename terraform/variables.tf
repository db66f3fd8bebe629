################################################################################
# Naming and placement
################################################################################

variable "region" {
  description = "AWS region to deploy into; null uses the provider's usual sources (AWS_REGION, profile)."
  type        = string
  default     = null

  validation {
    condition     = var.region == null || can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must look like eu-west-1, or be null."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (queues, functions, table, bucket, alarms)."
  type        = string
  default     = "harvest"

  validation {
    # Short enough that "<prefix>-output-<account>-<region>" fits S3's 63 characters.
    condition     = can(regex("^[a-z][a-z0-9-]{0,22}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 2-24 characters of lowercase letters, digits and hyphens, starting with a letter."
  }
}

variable "tags" {
  description = "Tags applied to every resource (provider default_tags)."
  type        = map(string)
  default     = {}

  validation {
    condition     = alltrue([for k, v in var.tags : length(k) <= 128 && length(v) <= 256])
    error_message = "Tag keys are at most 128 characters and values at most 256."
  }
}

################################################################################
# Vendor
################################################################################

variable "vendor_url" {
  description = "Base URL of the vendor API (paths under it start with /v1); https:// unless allow_insecure_vendor_url is true."
  type        = string

  validation {
    condition     = can(regex("^https?://[^/]+", var.vendor_url)) && !endswith(var.vendor_url, "/")
    error_message = "vendor_url must be http(s)://host[/path] without a trailing slash."
  }

  # The token travels in every request's Authorization header: never in clear text.
  validation {
    condition     = startswith(var.vendor_url, "https://") || var.allow_insecure_vendor_url
    error_message = "vendor_url must start with https:// (allow_insecure_vendor_url = true admits http:// for a local simulator only)."
  }
}

variable "allow_insecure_vendor_url" {
  description = "Admit an http:// vendor_url (HARVEST_ALLOW_HTTP): only for a simulator on a trusted network, since the token would travel in clear text."
  type        = bool
  default     = false
  nullable    = false
}

variable "vendor_token_parameter_name" {
  description = "Name of the SSM SecureString holding the vendor token. With vendor_token unset it must already exist; null means /<name_prefix>/vendor-token."
  type        = string
  default     = null

  validation {
    condition     = var.vendor_token_parameter_name == null || can(regex("^/?[-a-zA-Z0-9_./]{1,1000}$", var.vendor_token_parameter_name))
    error_message = "vendor_token_parameter_name must be a valid SSM parameter name (letters, digits, _ . - /)."
  }
}

variable "vendor_token" {
  description = "The vendor token. When set, Terraform creates the SecureString parameter (the value is then in the Terraform state: keep the state encrypted). Leave null to use an existing parameter."
  type        = string
  default     = null
  sensitive   = true

  validation {
    condition     = var.vendor_token == null || try(length(var.vendor_token) > 0, false)
    error_message = "vendor_token must be non-empty when set."
  }
}

variable "vendor_token_kms_key_arn" {
  description = "Customer managed KMS key encrypting the token parameter; null uses the AWS managed aws/ssm key (no kms:Decrypt grant needed)."
  type        = string
  default     = null

  validation {
    condition     = var.vendor_token_kms_key_arn == null || can(regex("^arn:aws[a-z-]*:kms:", var.vendor_token_kms_key_arn))
    error_message = "vendor_token_kms_key_arn must be a KMS key ARN."
  }
}

variable "vendor_max_pages" {
  description = "Pages one listing may have before its message is poison and dead-lettered (HARVEST_MAX_PAGES), so a cursor that never ends cannot hold a drain forever."
  type        = number
  default     = 1000

  validation {
    condition     = var.vendor_max_pages >= 1 && var.vendor_max_pages <= 1000000 && floor(var.vendor_max_pages) == var.vendor_max_pages
    error_message = "vendor_max_pages must be a whole number from 1 to 1000000."
  }
}

variable "vendor_max_retry_after" {
  description = "Longest vendor Retry-After, in seconds, waited out inside a call; a longer one returns the message to its queue for that long (HARVEST_MAX_RETRY_AFTER)."
  type        = number
  default     = 60

  validation {
    condition     = var.vendor_max_retry_after > 0 && var.vendor_max_retry_after <= 900
    error_message = "vendor_max_retry_after must be > 0 and <= 900 seconds (the longest Lambda timeout)."
  }
}

variable "vendor_max_page_bytes" {
  description = "Largest vendor page body, in bytes, a function reads; a larger one makes its message poison (HARVEST_MAX_PAGE_BYTES). It bounds the memory one page can take."
  type        = number
  default     = 8388608

  validation {
    condition     = var.vendor_max_page_bytes >= 1024 && var.vendor_max_page_bytes <= 1073741824 && floor(var.vendor_max_page_bytes) == var.vendor_max_page_bytes
    error_message = "vendor_max_page_bytes must be a whole number of bytes from 1024 to 1073741824 (1 GiB)."
  }
}

variable "rate_calls" {
  description = "Vendor calls allowed per rate_period, shared by every function (the vendor's L)."
  type        = number
  default     = 100

  validation {
    condition     = var.rate_calls >= 1 && floor(var.rate_calls) == var.rate_calls
    error_message = "rate_calls must be a whole number >= 1."
  }
}

variable "rate_period" {
  description = "Length in seconds of the vendor's rolling rate window (the vendor's W)."
  type        = number
  default     = 1

  validation {
    condition     = var.rate_period > 0 && var.rate_period <= 3600
    error_message = "rate_period must be > 0 and <= 3600 seconds."
  }
}

################################################################################
# Queues and drains
################################################################################

variable "max_receive_count" {
  description = "Receives after which a drain dead-letters a message itself (HARVEST_MAX_RECEIVE_COUNT); the SQS redrive uses this + 1."
  type        = number
  default     = 5

  validation {
    condition     = var.max_receive_count >= 1 && var.max_receive_count <= 999 && floor(var.max_receive_count) == var.max_receive_count
    error_message = "max_receive_count must be a whole number from 1 to 999 (SQS allows 1000 with the extra redrive receive)."
  }
}

variable "enable_redrive_allow_policy" {
  description = "Attach the byQueue redrive-allow policy to each DLQ (false only for emulators without it, such as moto)."
  type        = bool
  default     = true
  nullable    = false
}

variable "queue_retention_seconds" {
  description = "How long a stage queue keeps a message. Default 14 days, as long as the DLQs: a long vendor token outage leaves messages queued (drains stop on a 401 without receiving), and they must not expire silently before the token is fixed."
  type        = number
  default     = 1209600

  validation {
    condition     = var.queue_retention_seconds >= 3600 && var.queue_retention_seconds <= 1209600
    error_message = "queue_retention_seconds must be between 3600 (1 hour) and 1209600 (14 days)."
  }
}

variable "drain_timeout" {
  description = "Timeout in seconds of each drain invocation; queue visibility timeout is this + 60."
  type        = number
  default     = 120

  validation {
    condition     = var.drain_timeout >= 30 && var.drain_timeout <= 900 && floor(var.drain_timeout) == var.drain_timeout
    error_message = "drain_timeout must be a whole number of seconds from 30 to 900."
  }
}

variable "drain_memory" {
  description = "Memory (MB) of each drain function; it sets the CPU share (1,769 MB = 1 vCPU), which bounds a drain's pace. In the AWS-mode bench with every sandbox held to Lambda's share, a vendor at 100 calls/s got 0.42-0.59 of its limit at 256 MB, 0.73 at 512 and 0.83-0.85 at 1024; the GB-s of a 50,000-call harvest cost about $0.02 at 1024 (README, Cost model)."
  type        = number
  default     = 1024

  validation {
    condition     = var.drain_memory >= 128 && var.drain_memory <= 10240
    error_message = "drain_memory must be between 128 and 10240 MB."
  }
}

variable "drain_reserved_concurrency" {
  description = "Reserved concurrency per drain function: 2 lets the next minute's run (or a drain's successor) start while the last one finishes."
  type        = number
  default     = 2

  validation {
    condition     = var.drain_reserved_concurrency >= 1 && var.drain_reserved_concurrency <= 10 && floor(var.drain_reserved_concurrency) == var.drain_reserved_concurrency
    error_message = "drain_reserved_concurrency must be a whole number from 1 to 10."
  }
}

variable "drain_concurrency" {
  description = "The most messages one drain invocation keeps in process (HARVEST_CONCURRENCY). It uses rate x mean vendor latency x 2 of them (Little's law), at least 10: 64 per invocation x reserved concurrency 2 carries 100 calls/s at up to 640 ms per call. Each holds at most one page (vendor_max_page_bytes) while it is parsed."
  type        = number
  default     = 64

  validation {
    condition     = var.drain_concurrency >= 1 && var.drain_concurrency <= 256 && floor(var.drain_concurrency) == var.drain_concurrency
    error_message = "drain_concurrency must be a whole number from 1 to 256."
  }
}

variable "drain_safety_margin" {
  description = "Seconds at the end of an invocation in which a drain starts no new work (HARVEST_SAFETY_MARGIN); must be below drain_timeout."
  type        = number
  default     = 30

  validation {
    condition     = var.drain_safety_margin >= 1 && var.drain_safety_margin <= 300
    error_message = "drain_safety_margin must be between 1 and 300 seconds."
  }
}

variable "vendor_read_timeout" {
  description = "Seconds a vendor response may stall before the call is retried (HARVEST_READ_TIMEOUT)."
  type        = number
  default     = 10

  validation {
    condition     = var.vendor_read_timeout > 0 && var.vendor_read_timeout <= 120
    error_message = "vendor_read_timeout must be > 0 and <= 120 seconds."
  }
}

variable "retry_delay" {
  description = "First retry delay in seconds of a failed message, doubling per receive (HARVEST_RETRY_DELAY)."
  type        = number
  default     = 5

  validation {
    condition     = var.retry_delay >= 0 && var.retry_delay <= 900
    error_message = "retry_delay must be between 0 and 900 seconds (SQS's longest delay)."
  }
}

variable "receive_wait_seconds" {
  description = "Long-poll wait in seconds of a drain's receive on an empty queue (HARVEST_WAIT_SECONDS)."
  type        = number
  default     = 1

  validation {
    condition     = var.receive_wait_seconds >= 0 && var.receive_wait_seconds <= 20
    error_message = "receive_wait_seconds must be between 0 and 20 (SQS's longest long poll)."
  }
}

variable "schedules_enabled" {
  description = "Whether the kickoff and drain schedules are enabled (false pauses the harvest without destroying anything)."
  type        = bool
  default     = true
  nullable    = false
}

################################################################################
# Kickoff and replay
################################################################################

variable "kickoff_schedule" {
  description = "EventBridge schedule of the daily kickoff (UTC); it harvests the previous UTC day."
  type        = string
  default     = "cron(15 0 * * ? *)"

  validation {
    condition     = can(regex("^(cron|rate)\\(.+\\)$", var.kickoff_schedule))
    error_message = "kickoff_schedule must be an EventBridge cron(...) or rate(...) expression."
  }
}

variable "kickoff_timeout" {
  description = "Timeout in seconds of the kickoff function (lists the first level's entities, enqueues them)."
  type        = number
  default     = 300

  validation {
    condition     = var.kickoff_timeout >= 10 && var.kickoff_timeout <= 900
    error_message = "kickoff_timeout must be between 10 and 900 seconds."
  }
}

variable "replay_timeout" {
  description = "Timeout in seconds of the replay function (moves DLQ messages back)."
  type        = number
  default     = 300

  validation {
    condition     = var.replay_timeout >= 10 && var.replay_timeout <= 900
    error_message = "replay_timeout must be between 10 and 900 seconds."
  }
}

variable "lambda_zip_path" {
  description = "Path of the deployment zip built by scripts/package.py (relative to the directory terraform runs in)."
  type        = string
  default     = "../build/lambda.zip"

  validation {
    condition     = endswith(var.lambda_zip_path, ".zip")
    error_message = "lambda_zip_path must name a .zip file."
  }
}

variable "profile_json_path" {
  description = "Path of the profile.json scripts/package.py writes beside the zip (make package PROFILE=...): the vendor profile's stages and output keys, which every per-stage resource and the Glue columns follow, and the profile's file inside the zip (every function's HARVEST_PROFILE). Relative to the directory terraform runs in."
  type        = string
  default     = "../build/profile.json"

  validation {
    condition     = endswith(var.profile_json_path, ".json") && can(jsondecode(file(var.profile_json_path)))
    error_message = "profile_json_path must name the profile.json that scripts/package.py writes beside the zip (run `make package` first)."
  }

  # A hand-edited or stale file must not deploy a broken fan-out. (`for p in [...]` names
  # the decoded file once.)
  validation {
    condition = try(alltrue([
      for p in [jsondecode(file(var.profile_json_path))] :
      length(p.stages) >= 1
      && length(distinct([for stage in p.stages : stage.name])) == length(p.stages)
      && alltrue([
        for i, stage in p.stages :
        # pipeline/profile.py's rule: 24 + "-drain-" + 24 characters fit Lambda's 64.
        can(regex("^[a-z][a-z0-9_]{0,23}$", stage.name))
        && stage.depth == i + 1
        && stage.child == try(p.stages[i + 1].name, null)
      ])
    ]), false)
    error_message = "profile_json_path: the stages must be listed in order (depth 1, 2, ...), with distinct names matching [a-z][a-z0-9_]{0,23}, each one's child the next stage and the last one's null. Rebuild the file with scripts/package.py."
  }

  validation {
    condition = try(alltrue([
      for p in [jsondecode(file(var.profile_json_path))] :
      [for stage in p.stages : stage.key] == p.keys
      && length(distinct(p.keys)) == length(p.keys)
      && alltrue([for key in p.keys : can(regex("^[A-Za-z_][A-Za-z0-9_]{0,63}$", key))])
      # The other columns of the points table (analytics.tf).
      && length(setintersection(toset(p.keys), ["run_id", "ts", "value", "dt"])) == 0
    ]), false)
    error_message = "profile_json_path: keys must be the stages' output keys in order, distinct, each a column name ([A-Za-z_][A-Za-z0-9_]{0,63}) other than run_id, ts, value and dt. Rebuild the file with scripts/package.py."
  }

  validation {
    condition     = try(can(regex("^profiles/[^/].*\\.toml$", jsondecode(file(var.profile_json_path)).file)), false)
    error_message = "profile_json_path: file must be the profile's path inside the zip, profiles/<name>.toml. Rebuild the file with scripts/package.py."
  }
}

variable "log_level" {
  description = "Powertools log level of every function (POWERTOOLS_LOG_LEVEL)."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

variable "log_retention_days" {
  description = "Retention of the functions' CloudWatch log groups."
  type        = number
  default     = 30

  validation {
    condition     = contains([1, 3, 5, 7, 14, 30, 60, 90, 120, 150, 180, 365, 400, 545, 731, 1096, 1827, 2192, 2557, 2922, 3288, 3653], var.log_retention_days)
    error_message = "log_retention_days must be a value CloudWatch Logs accepts (1, 3, 5, 7, 14, 30, 60, 90, ... 3653)."
  }
}

################################################################################
# Storage
################################################################################

variable "output_bucket_name" {
  description = "Name of the output bucket; null means <name_prefix>-output-<account>-<region>."
  type        = string
  default     = null

  validation {
    condition     = var.output_bucket_name == null || can(regex("^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$", var.output_bucket_name))
    error_message = "output_bucket_name must be a valid S3 bucket name."
  }
}

variable "output_prefix" {
  description = "Key prefix under which the last stage's drains write (HARVEST_SINK is s3://bucket/prefix)."
  type        = string
  default     = "harvest"

  validation {
    condition     = can(regex("^[A-Za-z0-9!_.*'()-]+(/[A-Za-z0-9!_.*'()-]+)*$", var.output_prefix))
    error_message = "output_prefix must be one or more safe key segments without leading or trailing slash."
  }
}

variable "output_lifecycle_days" {
  description = "Days after which harvested objects expire."
  type        = number
  default     = 90

  validation {
    condition     = var.output_lifecycle_days >= 1 && floor(var.output_lifecycle_days) == var.output_lifecycle_days
    error_message = "output_lifecycle_days must be a whole number >= 1."
  }
}

variable "output_noncurrent_days" {
  description = "Days after which overwritten (noncurrent) object versions expire."
  type        = number
  default     = 7

  validation {
    condition     = var.output_noncurrent_days >= 1 && floor(var.output_noncurrent_days) == var.output_noncurrent_days
    error_message = "output_noncurrent_days must be a whole number >= 1."
  }
}

variable "output_force_destroy" {
  description = "Let terraform destroy delete the output bucket with its objects (tests and sandboxes only)."
  type        = bool
  default     = false
  nullable    = false
}

variable "enable_tls_only_bucket_policy" {
  description = "Attach the bucket policy denying requests without TLS (false only for emulators that ignore policy conditions, such as moto, where the deny would block every request)."
  type        = bool
  default     = true
  nullable    = false
}

variable "state_retention_days" {
  description = "Days a run ledger or rate budget item of the state table lives after its last write (HARVEST_STATE_RETENTION_DAYS): the functions set its expires_at, the table's TTL attribute. Longer than a DLQ keeps a message (14 days), so that a replayed message still finds its run."
  type        = number
  default     = 35

  validation {
    condition     = var.state_retention_days > 14 && floor(var.state_retention_days) == var.state_retention_days
    error_message = "state_retention_days must be a whole number of days over 14 (the DLQs keep messages 14 days)."
  }
}

variable "state_table_deletion_protection" {
  description = "DynamoDB deletion protection on the state table (turn off before destroying)."
  type        = bool
  default     = true
  nullable    = false
}

################################################################################
# Monitoring
################################################################################

variable "alarm_email" {
  description = "Email address subscribed to the alarm topic; null subscribes nobody."
  type        = string
  default     = null

  validation {
    condition     = var.alarm_email == null || can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.alarm_email))
    error_message = "alarm_email must be an email address or null."
  }
}

variable "oldest_message_alarm_seconds" {
  description = "Alarm when a stage queue's oldest message is older than this (the harvest is stuck)."
  type        = number
  default     = 3600

  validation {
    condition     = var.oldest_message_alarm_seconds >= 300
    error_message = "oldest_message_alarm_seconds must be at least 300."
  }
}

variable "run_settle_alarm_seconds" {
  description = "Alarm when a run has not settled (every entity done, gone or dead) this many seconds after its kickoff; the drains publish the oldest unsettled run's age as Harvest/OldestUnsettledRunAge."
  type        = number
  default     = 21600

  validation {
    condition     = var.run_settle_alarm_seconds > 0
    error_message = "run_settle_alarm_seconds must be > 0."
  }
}

variable "enable_dashboard" {
  description = "Create the CloudWatch dashboard (false where the API is unavailable)."
  type        = bool
  default     = true
  nullable    = false
}

################################################################################
# Analytics (terraform/analytics.tf)
################################################################################

variable "glue_database_name" {
  description = "Glue database of the points table; null derives <name_prefix>_analytics (hyphens become underscores)."
  type        = string
  default     = null

  validation {
    condition     = var.glue_database_name == null || can(regex("^[a-z_][a-z0-9_]{0,254}$", var.glue_database_name))
    error_message = "glue_database_name must be lowercase letters, digits and underscores (Athena's rule), or null."
  }
}

variable "analytics_first_date" {
  description = "First date (YYYY-MM-DD, UTC) the points table's dt partition projection covers; it runs to today."
  type        = string
  default     = "2024-01-01"

  validation {
    condition     = can(regex("^[0-9]{4}-[0-9]{2}-[0-9]{2}$", var.analytics_first_date)) && can(formatdate("YYYY", "${var.analytics_first_date}T00:00:00Z"))
    error_message = "analytics_first_date must be a real date written YYYY-MM-DD."
  }
}

variable "athena_bytes_scanned_cutoff" {
  description = "Most bytes one query in the Athena workgroup may scan before Athena cancels it."
  type        = number
  default     = 10737418240 # 10 GiB

  validation {
    # Athena's own minimum is 10 MB.
    condition     = var.athena_bytes_scanned_cutoff >= 10485760
    error_message = "athena_bytes_scanned_cutoff must be at least 10485760 (10 MB)."
  }
}
