# The four Cloud Tasks queues. Cloud Tasks has no dead-letter setting: on the last attempt the worker
# hands the series to the dead-letter queue itself (DESIGN.md invariant 4), which is why the worker must
# know the convert queue's RetryConfig exactly (invariant 5).

# Convert tasks: one per DICOM series, delivered to the Cloud Run worker.
resource "google_cloud_tasks_queue" "convert" {
  project  = var.project_id
  name     = local.queue_ids.convert
  location = var.region

  # The same object sets DICOMFLOW_RETRY_* on the worker (main.tf local.retry_env). Change it there, never
  # here: tests/infra fails if these arguments stop reading var.convert_retry.
  retry_config {
    max_attempts       = var.convert_retry.max_attempts
    min_backoff        = "${var.convert_retry.min_backoff_seconds}s"
    max_backoff        = "${var.convert_retry.max_backoff_seconds}s"
    max_doublings      = var.convert_retry.max_doublings
    max_retry_duration = "0s" # unlimited: only max_attempts ends retries, as RetryPolicy assumes
  }

  # Explicit limits (Cloud Tasks' defaults are not documented as stable). Concurrency defaults to the
  # worker's max instances: more in-flight tasks would only meet 429s from Cloud Run.
  rate_limits {
    max_dispatches_per_second = var.convert_max_dispatches_per_second
    max_concurrent_dispatches = local.convert_max_concurrent_dispatches
  }

  stackdriver_logging_config {
    sampling_ratio = var.tasks_logging_sampling_ratio
  }

  depends_on = [google_project_service.this]
}

# Expand, dead-letter and changes tasks: short, idempotent handlers in Cloud Functions. They retry with
# dicomflow.domain.retry.CONTROL_POLICY's numbers (main.tf local.control_retry).
resource "google_cloud_tasks_queue" "control" {
  for_each = {
    dead_letter = local.queue_ids.dead_letter
    expand      = local.queue_ids.expand
    changes     = local.queue_ids.changes
  }

  project  = var.project_id
  name     = each.value
  location = var.region

  retry_config {
    max_attempts       = local.control_retry.max_attempts
    min_backoff        = "${local.control_retry.min_backoff_seconds}s"
    max_backoff        = "${local.control_retry.max_backoff_seconds}s"
    max_doublings      = local.control_retry.max_doublings
    max_retry_duration = "0s"
  }

  rate_limits {
    max_dispatches_per_second = var.control_max_dispatches_per_second
    max_concurrent_dispatches = var.control_max_concurrent_dispatches
  }

  stackdriver_logging_config {
    sampling_ratio = var.tasks_logging_sampling_ratio
  }

  depends_on = [google_project_service.this]
}
