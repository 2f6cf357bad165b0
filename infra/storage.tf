# The functions' source archive. `make dist` builds ../dist/functions-source.zip; its MD5 is part of the
# object name, so a new archive is a new object and every function is redeployed from it.

resource "google_storage_bucket" "functions_source" {
  #checkov:skip=CKV_GCP_62:Holds only the functions source archive (no PHI, no secrets), written by Terraform and read by Cloud Build; Cloud Storage Data Access audit logs can be enabled project-wide if object access must be audited, a usage-log bucket adds nothing.
  project                     = var.project_id
  name                        = "${var.project_id}-${var.name_prefix}-functions-source"
  location                    = var.region
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = !var.deletion_protection

  versioning {
    enabled = true
  }

  # Old archives are only needed to roll back; keep the five newest noncurrent versions for 30 days.
  lifecycle_rule {
    action {
      type = "Delete"
    }
    condition {
      num_newer_versions = 5
      with_state         = "ARCHIVED"
    }
  }
  lifecycle_rule {
    action {
      type = "Delete"
    }
    condition {
      days_since_noncurrent_time = 30
      with_state                 = "ARCHIVED"
    }
  }

  depends_on = [google_project_service.this]
}

resource "google_storage_bucket_object" "functions_source" {
  bucket       = google_storage_bucket.functions_source.name
  name         = "functions-source-${filemd5(var.functions_source_zip)}.zip"
  source       = var.functions_source_zip
  content_type = "application/zip"
}
