# Cloud Scheduler jobs calling the reconcile and renew_channels functions with an OIDC token of the
# scheduler service account (the only identity allowed to invoke them).

locals {
  scheduled_jobs = {
    reconcile = {
      schedule    = var.reconcile_schedule
      description = "Requeue or dead-letter series a crash left behind; restart stalled expansions."
      # It runs again in 10 minutes anyway: one quick retry is enough.
      retry_count = 1
    }
    renew = {
      schedule    = var.renew_channels_schedule
      description = "Renew Drive watch channels before they expire (channels last at most a week)."
      # A missed renewal stops automatic conversion of new exams: retry harder.
      retry_count = 5
    }
  }
}

resource "google_cloud_scheduler_job" "job" {
  for_each = local.scheduled_jobs

  project     = var.project_id
  region      = var.region
  name        = local.functions[each.key].name
  description = each.value.description
  schedule    = each.value.schedule
  time_zone   = var.scheduler_time_zone
  # Scheduler allows at most 30 min for HTTP targets; the functions time out first.
  attempt_deadline = "${min(local.functions[each.key].timeout + 30, 1800)}s"

  retry_config {
    retry_count          = each.value.retry_count
    min_backoff_duration = "30s"
    max_backoff_duration = "600s"
    max_doublings        = 3
    max_retry_duration   = "0s"
  }

  http_target {
    uri         = local.function_urls[each.key]
    http_method = "POST"
    headers = {
      "Content-Type" = "application/json"
    }
    body = base64encode("{}")

    oidc_token {
      service_account_email = google_service_account.scheduler.email
      audience              = local.function_urls[each.key]
    }
  }

  depends_on = [
    google_project_service.this,
    google_cloud_run_v2_service_iam_member.function_invoker,
  ]
}
