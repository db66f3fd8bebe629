################################################################################
# Analytics: the compacted Parquet layer as a Glue table, queried with Athena
#
# `harvest compact --aws` writes each complete run's points to
# <sink>/points/dt=YYYY-MM-DD/<run_id>.part-NNNNN.parquet (pipeline/compact.py). The table
# finds its partitions by projection on dt: no crawler, no MSCK REPAIR, nothing to run
# when a new day lands.
################################################################################

locals {
  # Glue and Athena names take underscores, not hyphens.
  glue_database_name = coalesce(var.glue_database_name, replace("${var.name_prefix}_analytics", "-", "_"))
  points_location    = "s3://${aws_s3_bucket.output.id}/${var.output_prefix}/points/"
  # Query results sit in the output bucket (SSE-KMS by default, TLS only, public access
  # blocked) beside the output, and expire with it.
  athena_results_location = "s3://${aws_s3_bucket.output.id}/${var.output_prefix}/athena-results/"
}

resource "aws_glue_catalog_database" "analytics" {
  name        = local.glue_database_name
  description = "Harvest output as tables (the compacted Parquet layer)."
}

resource "aws_glue_catalog_table" "points" {
  name          = "points"
  database_name = aws_glue_catalog_database.analytics.name
  description   = "One row per harvested data point; partitioned by the point's UTC date."
  table_type    = "EXTERNAL_TABLE"

  parameters = {
    EXTERNAL                      = "TRUE"
    classification                = "parquet"
    "parquet.compression"         = "ZSTD"
    "projection.enabled"          = "true"
    "projection.dt.type"          = "date"
    "projection.dt.format"        = "yyyy-MM-dd"
    "projection.dt.range"         = "${var.analytics_first_date},NOW"
    "projection.dt.interval"      = "1"
    "projection.dt.interval.unit" = "DAYS"
    "storage.location.template"   = "${local.points_location}dt=$${dt}/"
  }

  partition_keys {
    name = "dt"
    type = "string"
  }

  storage_descriptor {
    location      = local.points_location
    input_format  = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat"
    output_format = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat"

    ser_de_info {
      serialization_library = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe"
      parameters = {
        "serialization.format" = "1"
      }
    }

    # The columns of pipeline/compact.py's Parquet files, in order: the run, then one id
    # per level of the profile (its output keys, from profile.json), then the point.
    columns {
      name = "run_id"
      type = "string"
    }

    dynamic "columns" {
      for_each = local.profile.keys

      content {
        name = columns.value
        type = "string"
      }
    }

    columns {
      name = "ts"
      type = "timestamp"
    }

    columns {
      name = "value"
      type = "double"
    }
  }
}

resource "aws_athena_workgroup" "analytics" {
  name          = "${var.name_prefix}-analytics"
  description   = "Queries over the harvest's Parquet layer; results in the output bucket."
  force_destroy = var.output_force_destroy

  configuration {
    # Clients cannot send results elsewhere or unencrypted, nor lift the scan cutoff.
    enforce_workgroup_configuration    = true
    publish_cloudwatch_metrics_enabled = true
    bytes_scanned_cutoff_per_query     = var.athena_bytes_scanned_cutoff

    engine_version {
      selected_engine_version = "Athena engine version 3"
    }

    result_configuration {
      output_location = local.athena_results_location

      encryption_configuration {
        encryption_option = "SSE_S3"
      }
    }
  }
}
