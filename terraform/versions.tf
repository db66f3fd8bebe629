terraform {
  # 1.9: a variable's validation may refer to another variable (vendor_url).
  required_version = ">= 1.9"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = "~> 5.0"
    }
  }
}
