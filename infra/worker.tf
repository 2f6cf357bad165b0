# The conversion worker: Cloud Run service running container/Dockerfile's image. Cloud Tasks calls it
# once per series (convert queue), with an OIDC token of the tasks service account.

resource "google_cloud_run_v2_service" "worker" {
  project             = var.project_id
  name                = local.worker_name
  location            = var.region
  description         = "dicomflow worker: downloads one DICOM series, runs dcm2niix, uploads the NIfTI outputs"
  ingress             = var.worker_ingress
  deletion_protection = var.deletion_protection

  template {
    service_account = google_service_account.worker.email

    # One series per instance at a time: a conversion uses most of the instance's CPU and memory, and
    # /tmp is RAM (GCP_FACTS §6, gotcha 18).
    max_instance_request_concurrency = 1

    # The request timeout equals the convert tasks' dispatch deadline: Cloud Tasks gives up at the same
    # moment Cloud Run would, and the worker stops dcm2niix 300 s earlier (DICOMFLOW_CONVERT_TIMEOUT_SECONDS).
    timeout = "${var.dispatch_deadline_seconds}s"

    # Second-generation runtime: full Linux compatibility and faster CPU for dcm2niix.
    execution_environment = "EXECUTION_ENVIRONMENT_GEN2"

    # Scale to zero when idle; the maximum bounds parallel Drive traffic (Drive quotas are per user).
    scaling {
      min_instance_count = 0
      max_instance_count = var.worker_max_instances
    }

    containers {
      name  = "worker"
      image = var.image

      ports {
        container_port = 8080
      }

      resources {
        limits = {
          cpu    = var.worker_cpu
          memory = "${var.worker_memory_mib}Mi"
        }
        # CPU is allocated only while a request runs (request-based billing). The worker answers only
        # after the series is recorded, never "202 then convert in the background" (gotcha 13).
        cpu_idle          = true
        startup_cpu_boost = true
      }

      dynamic "env" {
        for_each = local.worker_env
        content {
          name  = env.key
          value = env.value
        }
      }

      dynamic "volume_mounts" {
        for_each = var.drive_user_oauth ? ["drive-oauth"] : []
        content {
          name       = volume_mounts.value
          mount_path = local.drive_secret_mount
        }
      }
    }

    dynamic "volumes" {
      for_each = var.drive_user_oauth ? ["drive-oauth"] : []
      content {
        name = volumes.value
        secret {
          secret = google_secret_manager_secret.drive_oauth_token[0].secret_id
          items {
            version = "latest"
            path    = "token.json"
          }
        }
      }
    }
  }

  lifecycle {
    # Cloud Run couples memory and CPU (https://cloud.google.com/run/docs/configuring/services/memory-limits):
    # more than 4/8/16/24 GiB needs at least 2/4/6/8 vCPUs; 4 vCPUs need >= 2 GiB, 6 or 8 vCPUs >= 4 GiB.
    precondition {
      condition = tonumber(var.worker_cpu) >= (
        var.worker_memory_mib > 24576 ? 8 : var.worker_memory_mib > 16384 ? 6 : var.worker_memory_mib > 8192 ? 4 : var.worker_memory_mib > 4096 ? 2 : 1
      )
      error_message = "worker_memory_mib needs more vCPUs: above 4 GiB at least 2, above 8 GiB at least 4, above 16 GiB at least 6, above 24 GiB 8."
    }
    precondition {
      condition     = tonumber(var.worker_cpu) < 4 || var.worker_memory_mib >= (tonumber(var.worker_cpu) >= 6 ? 4096 : 2048)
      error_message = "worker_cpu 4 needs at least 2048 MiB of memory; 6 or 8 need at least 4096 MiB."
    }
  }

  depends_on = [
    google_project_service.this,
    google_project_iam_member.datastore_user,
    google_secret_manager_secret_iam_member.drive_oauth_token,
  ]
}
