################################################################################
# Output bucket (the S3 sink)
################################################################################

resource "aws_s3_bucket" "output" {
  bucket        = local.output_bucket_name
  force_destroy = var.output_force_destroy
}

resource "aws_s3_bucket_ownership_controls" "output" {
  bucket = aws_s3_bucket.output.id

  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "output" {
  bucket = aws_s3_bucket.output.id

  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_server_side_encryption_configuration" "output" {
  bucket = aws_s3_bucket.output.id

  rule {
    # The AWS managed aws/s3 key: writers need no KMS grant; the bucket key keeps KMS
    # requests (and cost) low.
    apply_server_side_encryption_by_default {
      sse_algorithm = "aws:kms"
    }
    bucket_key_enabled = true
  }
}

resource "aws_s3_bucket_versioning" "output" {
  bucket = aws_s3_bucket.output.id

  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "output" {
  bucket = aws_s3_bucket.output.id

  rule {
    id     = "expire-harvest"
    status = "Enabled"

    filter {
      prefix = "${var.output_prefix}/"
    }

    expiration {
      days = var.output_lifecycle_days
    }

    noncurrent_version_expiration {
      noncurrent_days = var.output_noncurrent_days
    }
  }

  rule {
    id     = "abort-incomplete-uploads"
    status = "Enabled"

    filter {}

    abort_incomplete_multipart_upload {
      days_after_initiation = 1
    }
  }

  # Lifecycle rules are rejected on a bucket whose versioning is still being set up.
  depends_on = [aws_s3_bucket_versioning.output]
}

data "aws_iam_policy_document" "output_bucket" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [aws_s3_bucket.output.arn, "${aws_s3_bucket.output.arn}/*"]

    principals {
      type        = "*"
      identifiers = ["*"]
    }

    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "output" {
  count = var.enable_tls_only_bucket_policy ? 1 : 0

  bucket = aws_s3_bucket.output.id
  policy = data.aws_iam_policy_document.output_bucket.json

  # S3 rejects a bucket policy while the public access block is being applied.
  depends_on = [aws_s3_bucket_public_access_block.output]
}

################################################################################
# State table: run ledger and shared rate budget
################################################################################

resource "aws_dynamodb_table" "state" {
  name                        = "${var.name_prefix}-state"
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  range_key                   = "sk"
  deletion_protection_enabled = var.state_table_deletion_protection

  attribute {
    name = "pk"
    type = "S"
  }

  attribute {
    name = "sk"
    type = "S"
  }

  # Every ledger and budget write sets expires_at (epoch seconds) state_retention_days ahead
  # (pipeline/aws/expiry.py).
  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled = true
  }
}

################################################################################
# Vendor token (only when Terraform is given the token; otherwise it already exists)
################################################################################

resource "aws_ssm_parameter" "vendor_token" {
  # Whether a token was given is not secret; the token is.
  count = nonsensitive(var.vendor_token != null) ? 1 : 0

  name        = local.vendor_token_parameter_name
  description = "Bearer token of the harvest vendor API"
  type        = "SecureString"
  value       = var.vendor_token
  key_id      = var.vendor_token_kms_key_arn
}
