# Secrets are created empty: their values never pass through Terraform (nor its state). Add a version
# with `gcloud secrets versions add` before the functions are deployed (docs/operations.md).

# Shared secret Drive echoes in X-Goog-Channel-Token; the webhook rejects notifications without it.
resource "google_secret_manager_secret" "webhook_token" {
  project             = var.project_id
  secret_id           = "${var.name_prefix}-webhook-token"
  deletion_protection = var.deletion_protection

  replication {
    auto {}
  }

  depends_on = [google_project_service.this]
}

# A Drive user's OAuth token (authorized-user JSON from `dicomflow auth`), only when dicomflow acts on
# Drive as a user. Mounted as a file at /secrets/drive/token.json.
resource "google_secret_manager_secret" "drive_oauth_token" {
  count = var.drive_user_oauth ? 1 : 0

  project             = var.project_id
  secret_id           = "${var.name_prefix}-drive-oauth-token"
  deletion_protection = var.deletion_protection

  replication {
    auto {}
  }

  depends_on = [google_project_service.this]
}

# The pseudonym key (docs/privacy.md): de-identified folder names are derived from it, so the same source
# folder always gets the same destination name and nobody without the key can test guessed patient names
# against it. 32+ random bytes in hex; only the expand function (which reads DICOM headers) gets it.
resource "google_secret_manager_secret" "pseudonym_key" {
  project             = var.project_id
  secret_id           = "${var.name_prefix}-pseudonym-key"
  deletion_protection = var.deletion_protection

  replication {
    auto {}
  }

  depends_on = [google_project_service.this]
}
