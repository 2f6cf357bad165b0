# APIs dicomflow uses. They stay enabled on destroy: other workloads in the project may need them, and
# disabling an API can delete data (Firestore) or break unrelated services.

locals {
  services = toset([
    "artifactregistry.googleapis.com",     # worker image and function builds
    "cloudbuild.googleapis.com",           # Cloud Functions gen2 builds the function images
    "cloudfunctions.googleapis.com",       # the functions
    "cloudresourcemanager.googleapis.com", # project IAM members, data.google_project
    "cloudscheduler.googleapis.com",       # reconcile / renew jobs
    "cloudtasks.googleapis.com",           # the four queues
    "drive.googleapis.com",                # sources and destinations
    "firestore.googleapis.com",            # state
    "iam.googleapis.com",                  # service accounts
    "iamcredentials.googleapis.com",       # acting as the Drive identity (service account impersonation)
    "logging.googleapis.com",              # structured logs, log-based metrics
    "monitoring.googleapis.com",           # alert policies, dashboard
    "run.googleapis.com",                  # the worker (and the functions' underlying services)
    "secretmanager.googleapis.com",        # webhook token, Drive OAuth token
    "storage.googleapis.com",              # functions source bucket
  ])
}

resource "google_project_service" "this" {
  for_each = local.services

  project                    = var.project_id
  service                    = each.value
  disable_on_destroy         = false
  disable_dependent_services = false
}
