# Provider ranges are pinned like the Cloud Foundation Toolkit modules (STYLE.md §11). The offline schema
# check in tests/infra uses hashicorp/google 7.45.0 and hashicorp/time 0.13.1 (tests/infra/data/).
terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.0"
    }
    # time_sleep only: alert policies wait until new log-based metrics have propagated (observability.tf).
    time = {
      source  = "hashicorp/time"
      version = "~> 0.13"
    }
  }
}
