# Provider ranges are pinned like the Cloud Foundation Toolkit modules (STYLE.md §11). The offline schema
# check in tests/infra uses hashicorp/google 7.45.0 (shared/terraform/google_provider_schema.json).
terraform {
  required_version = ">= 1.5"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 7.0"
    }
  }
}
