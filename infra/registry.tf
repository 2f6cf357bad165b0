# Docker repository for the worker image (container/Dockerfile). Push by immutable tag and deploy by
# digest: var.image = "${REGION}-docker.pkg.dev/${PROJECT}/${NAME_PREFIX}/worker@sha256:...".

resource "google_artifact_registry_repository" "images" {
  #checkov:skip=CKV_GCP_84:Images hold code only (no PHI, no secrets); Google-managed encryption at rest suffices and a customer-managed key would add a KMS dependency that can lock the worker out of its own image.
  project       = var.project_id
  location      = var.region
  repository_id = var.name_prefix
  format        = "DOCKER"
  description   = "dicomflow worker images"

  # A tag always names the same image, so a digest looked up from a tag stays meaningful.
  docker_config {
    immutable_tags = true
  }

  # Keep the ten newest versions of every image; delete untagged images older than 30 days.
  cleanup_policies {
    id     = "keep-recent"
    action = "KEEP"
    most_recent_versions {
      keep_count = 10
    }
  }
  cleanup_policies {
    id     = "delete-old-untagged"
    action = "DELETE"
    condition {
      tag_state  = "UNTAGGED"
      older_than = "2592000s"
    }
  }

  depends_on = [google_project_service.this]
}
