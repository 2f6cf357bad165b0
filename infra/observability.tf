# Log-based metrics, alert policies and the dashboard.
#
# Every dicomflow log line is one JSON object (DICOMFLOW_LOG_FORMAT=json); its `event` field is one of
# dicomflow.events.Event and most metrics below count those events. tests/infra checks that every
# jsonPayload.event named here is an Event member that the code really logs, and that every field a
# metric on dicomflow's own logs extracts (convert_seconds, status, code, event) is a field the code logs.
# Two metrics read Google's logs instead: Cloud Tasks' log of every task attempt (the queues'
# stackdriver_logging_config) and Cloud Scheduler's job attempt errors.
#
# Assumption (not verifiable offline): Cloud Functions gen2 write their logs as resource.type
# "cloud_run_revision" with resource.labels.service_name = the function name, like the worker. The scope
# below therefore covers the worker and every function of this deployment, and nothing else.

locals {
  log_scope   = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=~\"^${var.name_prefix}-\""
  user_metric = "logging.googleapis.com/user"

  # Functions people, Drive and Cloud Scheduler call (their 5xx are failures); the task handlers answer
  # 503 on purpose to make Cloud Tasks retry, and are watched through their queues' attempts instead.
  frontline_functions = [for key, fn in local.functions : fn.name if fn.invoker != "tasks"]
}

# --- log-based metrics ------------------------------------------------------------------------------------

resource "google_logging_metric" "series_succeeded" {
  project     = var.project_id
  name        = "${var.name_prefix}/series_succeeded"
  description = "Series converted and uploaded (event series_succeeded)."
  filter      = "${local.log_scope} AND jsonPayload.event=\"series_succeeded\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow series succeeded"
  }
}

resource "google_logging_metric" "series_dead_lettered" {
  project     = var.project_id
  name        = "${var.name_prefix}/series_dead_lettered"
  description = "Series given up on, by failure code (event series_dead_lettered)."
  filter      = "${local.log_scope} AND jsonPayload.event=\"series_dead_lettered\""

  label_extractors = {
    code = "EXTRACT(jsonPayload.code)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow series dead-lettered"

    labels {
      key         = "code"
      value_type  = "STRING"
      description = "dicomflow failure code"
    }
  }
}

# Both terminal outcomes in one metric: the denominator of the failure-rate alert and the dashboard's
# throughput chart. Parenthesized on purpose: in the Logging query language OR binds tighter than AND
# (unlike most languages), and explicit grouping keeps the filter right whichever way it is read.
resource "google_logging_metric" "series_finished" {
  project     = var.project_id
  name        = "${var.name_prefix}/series_finished"
  description = "Series that reached a terminal outcome (events series_succeeded and series_dead_lettered), by outcome."
  filter      = "${local.log_scope} AND (jsonPayload.event=\"series_succeeded\" OR jsonPayload.event=\"series_dead_lettered\")"

  label_extractors = {
    outcome = "EXTRACT(jsonPayload.event)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow series finished"

    labels {
      key         = "outcome"
      value_type  = "STRING"
      description = "series_succeeded or series_dead_lettered"
    }
  }
}

resource "google_logging_metric" "convert_seconds" {
  project         = var.project_id
  name            = "${var.name_prefix}/convert_seconds"
  description     = "dcm2niix wall time per converted series, in seconds (field convert_seconds of series_succeeded)."
  filter          = "${local.log_scope} AND jsonPayload.event=\"series_succeeded\""
  value_extractor = "EXTRACT(jsonPayload.convert_seconds)"

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "DISTRIBUTION"
    unit         = "s"
    display_name = "dicomflow conversion seconds"
  }

  # 0.5 s .. ~2.3 h in 24 exponential buckets.
  bucket_options {
    exponential_buckets {
      num_finite_buckets = 24
      growth_factor      = 1.5
      scale              = 0.5
    }
  }
}

resource "google_logging_metric" "batch_completed" {
  project     = var.project_id
  name        = "${var.name_prefix}/batch_completed"
  description = "Batches that finished, by final status (event batch_completed)."
  filter      = "${local.log_scope} AND jsonPayload.event=\"batch_completed\""

  label_extractors = {
    status = "EXTRACT(jsonPayload.status)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow batches completed"

    labels {
      key         = "status"
      value_type  = "STRING"
      description = "completed or completed_with_failures"
    }
  }
}

resource "google_logging_metric" "series_attempt_failed" {
  project     = var.project_id
  name        = "${var.name_prefix}/series_attempt_failed"
  description = "Conversion attempts that failed and will be retried, by failure code (event series_attempt_failed)."
  filter      = "${local.log_scope} AND jsonPayload.event=\"series_attempt_failed\""

  label_extractors = {
    code = "EXTRACT(jsonPayload.code)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow attempt failures"

    labels {
      key         = "code"
      value_type  = "STRING"
      description = "dicomflow failure code"
    }
  }
}

resource "google_logging_metric" "channel_renewal_failed" {
  project     = var.project_id
  name        = "${var.name_prefix}/channel_renewal_failed"
  description = "Drive watch channels that could not be renewed (event channel_renewal_failed)."
  filter      = "${local.log_scope} AND jsonPayload.event=\"channel_renewal_failed\""

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow channel renewal failures"
  }
}


resource "google_logging_metric" "batch_failed" {
  project     = var.project_id
  name        = "${var.name_prefix}/batch_failed"
  description = "Batches whose expansion failed (source gone, access revoked), by failure code (event batch_failed)."
  filter      = "${local.log_scope} AND jsonPayload.event=\"batch_failed\""

  label_extractors = {
    code = "EXTRACT(jsonPayload.code)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow batches failed"

    labels {
      key         = "code"
      value_type  = "STRING"
      description = "dicomflow failure code"
    }
  }
}

# Cloud Tasks writes one entry per attempt response to cloudtasks.googleapis.com/task_operations_log when
# the queue's stackdriver_logging_config samples it (queues.tf). jsonPayload.attemptResponseLog.status is
# the attempt's outcome as a canonical code name: OK for 2xx; the HTTP code otherwise maps to
# PERMISSION_DENIED (403), UNAUTHENTICATED (401), NOT_FOUND (404), RESOURCE_EXHAUSTED (429), UNAVAILABLE
# (503, which dicomflow's handlers answer to ask for a retry), DEADLINE_EXCEEDED (no answer within the
# dispatch deadline), INTERNAL/UNKNOWN (500, crashes). Field names as seen in real entries (type
# google.cloud.tasks.logging.v1.TaskActivityLog); the code mapping is the standard HTTP -> google.rpc one
# (assumption: not verifiable offline). This is the only view of attempts that never reached the handler
# (ingress, IAM/OIDC audience, a wrong URL, Cloud Run refusing requests while scaling).
resource "google_logging_metric" "task_attempts" {
  project     = var.project_id
  name        = "${var.name_prefix}/task_attempts"
  description = "Cloud Tasks attempts on dicomflow's queues, by queue and response status (Cloud Tasks attempt logs)."
  filter      = "logName=\"projects/${var.project_id}/logs/cloudtasks.googleapis.com%2Ftask_operations_log\" AND resource.type=\"cloud_tasks_queue\" AND resource.labels.queue_id=~\"^${var.name_prefix}-\" AND jsonPayload.attemptResponseLog.status:*"

  label_extractors = {
    queue  = "EXTRACT(resource.labels.queue_id)"
    status = "EXTRACT(jsonPayload.attemptResponseLog.status)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow task attempts"

    labels {
      key         = "queue"
      value_type  = "STRING"
      description = "Cloud Tasks queue id"
    }
    labels {
      key         = "status"
      value_type  = "STRING"
      description = "attempt outcome: OK for 2xx, else the canonical code of the HTTP answer (UNAVAILABLE = 503, ...)"
    }
  }
}

# Cloud Scheduler logs a failed job attempt (non-2xx or no answer) at severity ERROR on the
# cloud_scheduler_job resource (the same filter as google/exposure-notifications-server's
# CloudSchedulerJobFailed playbook).
resource "google_logging_metric" "scheduler_job_failed" {
  project     = var.project_id
  name        = "${var.name_prefix}/scheduler_job_failed"
  description = "Failed attempts of dicomflow's Cloud Scheduler jobs (reconcile, renew), by job."
  filter      = "resource.type=\"cloud_scheduler_job\" AND resource.labels.job_id=~\"^${var.name_prefix}-\" AND severity>=ERROR"

  label_extractors = {
    job = "EXTRACT(resource.labels.job_id)"
  }

  metric_descriptor {
    metric_kind  = "DELTA"
    value_type   = "INT64"
    unit         = "1"
    display_name = "dicomflow scheduler job failures"

    labels {
      key         = "job"
      value_type  = "STRING"
      description = "Cloud Scheduler job id"
    }
  }
}

# Cloud Monitoring answers 404 for a log-based metric until it has propagated (up to ~10 minutes) and an
# alert policy created meanwhile fails the apply (hashicorp/terraform-provider-google#11102, still open in
# 7.x; the API's own message: "If a metric was created recently, it could take up to 10 minutes to become
# available"). One wait, before every alert policy, re-run only when the set of metrics changes (triggers
# replace the resource, which sleeps again). Chosen over a documented two-phase apply: a first apply on an
# empty project then works in one go, and nobody has to remember a -target.
resource "time_sleep" "log_metrics_propagation" {
  create_duration = "${var.log_metric_propagation_seconds}s"

  triggers = {
    metrics = join(",", sort([
      google_logging_metric.series_succeeded.name,
      google_logging_metric.series_dead_lettered.name,
      google_logging_metric.series_finished.name,
      google_logging_metric.convert_seconds.name,
      google_logging_metric.batch_completed.name,
      google_logging_metric.series_attempt_failed.name,
      google_logging_metric.channel_renewal_failed.name,
      google_logging_metric.batch_failed.name,
      google_logging_metric.task_attempts.name,
      google_logging_metric.scheduler_job_failed.name,
    ]))
  }
}

# --- alerting ---------------------------------------------------------------------------------------------
#
# API rules these conditions follow (tests/infra/constraints.py checks them): a condition's duration is a
# whole number of minutes; `evaluation_missing_data` only on conditions with a duration of at least 60 s
# (HTTP 400 otherwise: GoogleCloudPlatform/monitoring-dashboard-samples#280); alignment periods of 60 s to
# 25 h; every policy that reads a log-based metric waits for time_sleep.log_metrics_propagation.

resource "google_monitoring_notification_channel" "email" {
  project      = var.project_id
  display_name = "dicomflow alerts (${var.alert_email})"
  type         = "email"
  labels = {
    email_address = var.alert_email
  }

  depends_on = [google_project_service.this]
}

resource "google_monitoring_alert_policy" "dead_letters" {
  project               = var.project_id
  display_name          = "dicomflow: series dead-lettered"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "At least one series dead-lettered in 5 minutes"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.series_dead_lettered.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      # Fires on the first dead letter; no evaluation_missing_data (not allowed with a zero duration, and
      # "no data" here simply means nothing failed).
      duration = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["metric.label.code"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: a series was dead-lettered"
    content   = <<-EOT
      **What it means.** At least one DICOM series will not be converted without help: it failed
      permanently (for example the folder is not shared, the files are not DICOM, dcm2niix rejected it)
      or it failed on its last attempt (var.convert_retry.max_attempts). The failure code is the
      `code` label of this incident.

      **What to do.**
      1. Dashboard "dicomflow (${var.name_prefix})", panel "Dead letters": each entry carries its
         `batch_id` label and a plain-language reason.
      2. List the failures: `dicomflow dlq list BATCH_ID`, or `GET /batches/BATCH_ID` (field `failures`),
         or the Firestore documents `batches/BATCH_ID/items/*` with `state = dead_lettered`
         (`failure.code`, `failure.reason`).
      3. Fix what the reason says (share the folder with the Drive identity, free Drive space, raise
         `worker_memory_mib` for "too large" series, ...).
      4. Redrive: `POST /batches/BATCH_ID:retry-dead-letters` or `dicomflow dlq retry BATCH_ID`.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

resource "google_monitoring_alert_policy" "failure_rate" {
  project               = var.project_id
  display_name          = "dicomflow: high series failure rate"
  combiner              = "AND"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  # Ratio of dead-lettered to finished (succeeded + dead-lettered) series over 30 minutes, computed by
  # Cloud Monitoring from two filters (condition_threshold with denominator_filter; no MQL).
  conditions {
    display_name = "Dead-lettered / finished series > ${var.failure_rate_threshold} over 30 minutes"
    condition_threshold {
      filter             = "metric.type=\"${local.user_metric}/${google_logging_metric.series_dead_lettered.name}\" AND resource.type=\"cloud_run_revision\""
      denominator_filter = "metric.type=\"${local.user_metric}/${google_logging_metric.series_finished.name}\" AND resource.type=\"cloud_run_revision\""
      comparison         = "COMPARISON_GT"
      threshold_value    = var.failure_rate_threshold
      duration           = "0s"
      aggregations {
        alignment_period     = "1800s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      denominator_aggregations {
        alignment_period     = "1800s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  # ... and enough series finished for the ratio to mean something.
  conditions {
    display_name = "At least ${var.failure_rate_min_series} series finished in 30 minutes"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.series_finished.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.failure_rate_min_series - 1
      duration        = "0s"
      aggregations {
        alignment_period     = "1800s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: many series are failing"
    content   = <<-EOT
      **What it means.** More than ${var.failure_rate_threshold * 100} % of the series that finished in the
      last 30 minutes were dead-lettered. One bad series is normal; this many usually has one common
      cause: a destination that is not writable, lost Drive access (token expired, folder unshared,
      `storageQuotaExceeded` for a service account writing to My Drive), a broken image release, or
      series too large for `worker_memory_mib`.

      **What to do.**
      1. Dashboard "dicomflow (${var.name_prefix})": which failure codes dominate ("Attempt failures and
         dead letters, by code"), and the "Dead letters" logs panel (batch ids and reasons).
      2. Fix the common cause (roll back `var.image` to the previous digest, re-share the folder, renew
         the OAuth token, raise memory), then redrive each affected batch: `dicomflow dlq retry BATCH_ID`
         or `POST /batches/BATCH_ID:retry-dead-letters`.
      3. To stop the damage first: `gcloud tasks queues pause ${local.queue_ids.convert} --location=${var.region}`
         (resume with `gcloud tasks queues resume`).

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

# A stall, not a backlog: convert tasks are waiting AND nothing finished for var.stall_alert_minutes. A
# big batch keeps finishing series and never fires this, whatever its queue age; a stuck pipeline (worker
# refused or crashing, queue dispatching nothing useful, every attempt timing out) fires it whatever the
# batch size. "Nothing finished" is a missing time series (log-based metrics write no zeros), hence
# EVALUATION_MISSING_DATA_ACTIVE, allowed because the duration is at least 60 s.
resource "google_monitoring_alert_policy" "convert_stall" {
  project               = var.project_id
  display_name          = "dicomflow: conversion stalled"
  combiner              = "AND"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "Tasks waiting in ${local.queue_ids.convert} for ${var.stall_alert_minutes} min"
    condition_threshold {
      filter          = "metric.type=\"cloudtasks.googleapis.com/queue/depth\" AND resource.type=\"cloud_tasks_queue\" AND resource.label.queue_id=\"${google_cloud_tasks_queue.convert.name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "${var.stall_alert_minutes * 60}s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_MIN"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
    }
  }

  conditions {
    display_name = "No series finished for ${var.stall_alert_minutes} min"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.series_finished.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_LT"
      threshold_value = 1
      duration        = "${var.stall_alert_minutes * 60}s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
      evaluation_missing_data = "EVALUATION_MISSING_DATA_ACTIVE"
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: conversion has stalled"
    content   = <<-EOT
      **What it means.** Convert tasks have been waiting for ${var.stall_alert_minutes} minutes and not a
      single series finished (neither converted nor dead-lettered) meanwhile. A large batch alone does not
      do this: it keeps finishing series. Something between the queue and the worker is broken.

      **What to do.**
      1. Dashboard "dicomflow (${var.name_prefix})", chart "Task attempts by status": what do convert
         attempts get back? `PERMISSION_DENIED`/`UNAUTHENTICATED`: the tasks service account lost
         `roles/run.invoker` on the worker, or the OIDC audience is wrong. `NOT_FOUND`: wrong worker URL.
         `RESOURCE_EXHAUSTED`: Cloud Run cannot start instances (quota, `worker_max_instances`).
         `DEADLINE_EXCEEDED`: every series runs past `dispatch_deadline_seconds`. `UNAVAILABLE`: the worker
         asks for retries (its logs say why) or cannot start (bad image: roll back `var.image`).
         No attempts at all: the queue is paused or rate-limited:
         `gcloud tasks queues describe ${local.queue_ids.convert} --location=${var.region}`
         (`gcloud tasks queues resume ...` if it is PAUSED).
      2. Worker logs: Logs Explorer, resource `cloud_run_revision`, service `${local.worker_name}`,
         severity >= WARNING.
      3. Nothing is lost meanwhile: tasks stay queued; items the queue gave up on are re-enqueued or
         dead-lettered by the reconciler (every `reconcile_schedule`).

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

# Convert attempts as Cloud Tasks saw them: this counts attempts Cloud Run refused before the worker ran
# (which the worker's own request metrics may not show). Some non-2xx are by design (503 = retry later).
resource "google_monitoring_alert_policy" "convert_attempts_failing" {
  project               = var.project_id
  display_name          = "dicomflow: convert attempts failing"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "Non-2xx / all attempts of ${local.queue_ids.convert} > ${var.convert_attempt_failure_ratio} over 15 minutes"
    condition_threshold {
      filter             = "metric.type=\"${local.user_metric}/${google_logging_metric.task_attempts.name}\" AND resource.type=\"cloud_tasks_queue\" AND metric.label.queue=\"${google_cloud_tasks_queue.convert.name}\" AND NOT metric.label.status=\"OK\""
      denominator_filter = "metric.type=\"${local.user_metric}/${google_logging_metric.task_attempts.name}\" AND resource.type=\"cloud_tasks_queue\" AND metric.label.queue=\"${google_cloud_tasks_queue.convert.name}\""
      comparison         = "COMPARISON_GT"
      threshold_value    = var.convert_attempt_failure_ratio
      duration           = "0s"
      aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      denominator_aggregations {
        alignment_period     = "900s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: many convert attempts fail"
    content   = <<-EOT
      **What it means.** More than ${var.convert_attempt_failure_ratio * 100} % of the convert task
      attempts in 15 minutes did not get a 2xx answer. A transient failure (Drive rate limit, Drive 5xx,
      Firestore contention) answers 503 on purpose so Cloud Tasks retries, so a few are normal; this many
      means crashes (out of memory: Cloud Run logs "Memory limit ... exceeded"), timeouts, a bad image, an
      outside system that is down, or requests refused before the worker runs.

      **What to do.**
      1. Dashboard "dicomflow (${var.name_prefix})", chart "Task attempts by status": the status says
         where it fails (see the "conversion stalled" runbook for each code).
      2. Worker logs: `jsonPayload.event="series_attempt_failed"` gives the failure code of each retried
         attempt (`rate_limited`, `converter_timeout`, ...).
      3. Out of memory: raise `worker_memory_mib` (and `worker_cpu`, Cloud Run couples them).
         Timeouts: series too large for `dispatch_deadline_seconds`.
         Drive `rateLimitExceeded`: lower `worker_max_instances` or `convert_max_dispatches_per_second`.
         New image: roll back `var.image` to the previous digest and `terraform apply`.
      4. Series are not lost meanwhile: they are retried, then dead-lettered and can be redriven.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

# Attempts on any dicomflow queue that the handler never answered itself, or answered with an error it
# never sends on purpose: everything except OK and UNAVAILABLE (503, the retry signal). Each one is a
# configuration or code fault, so the first one alerts.
resource "google_monitoring_alert_policy" "task_attempts_rejected" {
  project               = var.project_id
  display_name          = "dicomflow: task attempts rejected"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "Attempts answered other than 2xx or 503, by queue and status"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.task_attempts.name}\" AND resource.type=\"cloud_tasks_queue\" AND NOT metric.label.status=one_of(\"OK\", \"UNAVAILABLE\")"
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "600s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["metric.label.queue", "metric.label.status"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: Cloud Tasks attempts are being rejected"
    content   = <<-EOT
      **What it means.** Task attempts on a dicomflow queue (the `queue` label) got an answer dicomflow
      never sends on purpose (the `status` label). Tasks whose attempts all fail this way are dropped by
      Cloud Tasks after their last attempt; the reconciler re-creates or dead-letters their series, but
      until the cause is fixed nothing on that queue progresses.

      **What to do, by status.**
      - `PERMISSION_DENIED` / `UNAUTHENTICATED`: the tasks service account lacks `roles/run.invoker` on
        the target, or the OIDC audience does not match the target URL. `terraform apply` restores the
        grants; compare `DICOMFLOW_WORKER_URL` / the function URLs with `terraform output`.
      - `NOT_FOUND`: the task URL is wrong (route prefix, deleted function). Check the URLs as above.
      - `RESOURCE_EXHAUSTED`: Cloud Run refused the request (no instance available): lower the queue's
        `max_concurrent_dispatches` to at most the service's max instances.
      - `DEADLINE_EXCEEDED`: the handler did not answer within the task's dispatch deadline; check that
        the `DICOMFLOW_*DISPATCH_DEADLINE_SECONDS` of every function equal the handlers' timeouts.
      - `INTERNAL` / `UNKNOWN` / `INVALID_ARGUMENT` / `FAILED_PRECONDITION`: the handler crashed or
        rejected the task (`jsonPayload.event="task_rejected"` in its logs): a bug, roll back the release.
      Logs Explorer: `logName:"cloudtasks.googleapis.com%2Ftask_operations_log" AND
      NOT jsonPayload.attemptResponseLog.status="OK"` shows each attempt with its task and target.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

resource "google_monitoring_alert_policy" "function_errors" {
  project               = var.project_id
  display_name          = "dicomflow: function 5xx"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "5xx answers of the batch API, the webhook or a scheduled function"
    condition_threshold {
      filter          = "metric.type=\"run.googleapis.com/request_count\" AND resource.type=\"cloud_run_revision\" AND resource.label.service_name=one_of(${join(", ", [for name in local.frontline_functions : "\"${name}\""])}) AND metric.label.response_code_class=\"5xx\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["resource.label.service_name"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: a function answered 5xx"
    content   = <<-EOT
      **What it means.** The function named in the `service_name` label answered 5xx. For the batch API
      (`${local.functions.batches.name}`) a user's request failed; for the webhook
      (`${local.functions.webhook.name}`) Drive will retry the notification; for `${local.functions.reconcile.name}`
      or `${local.functions.renew.name}` the scheduled run failed (see also "scheduler job failed").
      The task-handler functions are not part of this alert: they answer 503 on purpose to be retried,
      and their attempts are watched per queue ("task attempts rejected").

      **What to do.**
      1. Logs Explorer: resource `cloud_run_revision`, service = the label, severity >= ERROR. A 503 with
         `Retry-After` is a passing outage of Firestore or Drive; a 500 is a bug (roll back the release:
         the previous `functions-source-<md5>.zip` object and `terraform apply`).
      2. Startup failures (no log line of dicomflow at all): a missing secret version
         (`gcloud secrets versions list ${google_secret_manager_secret.webhook_token.secret_id}`) or a
         bad `DICOMFLOW_*` setting (the first log line names the variable).

      Runbook: docs/operations.md, "Alerts".
    EOT
  }
}

resource "google_monitoring_alert_policy" "scheduler_failures" {
  project               = var.project_id
  display_name          = "dicomflow: scheduler job failed"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "A reconcile or renew run failed"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.scheduler_job_failed.name}\" AND resource.type=\"cloud_scheduler_job\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "600s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["metric.label.job"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: a scheduled job failed"
    content   = <<-EOT
      **What it means.** An attempt of the Cloud Scheduler job in the `job` label did not get a 2xx.
      `${local.functions.reconcile.name}` finishes what crashes and dropped tasks leave behind: while it
      fails, stuck series stay stuck. `${local.functions.renew.name}` renews Drive watch channels: while it
      fails, channels expire and new exams stop being converted automatically.

      **What to do.**
      1. Logs Explorer: `resource.type="cloud_scheduler_job" AND resource.labels.job_id="<job>"`: the
         status says why (`PERMISSION_DENIED`: the scheduler service account lost `roles/run.invoker`;
         `DEADLINE_EXCEEDED`: the function ran past its timeout; `UNAVAILABLE`/`INTERNAL`: see the
         function's own logs, service = the job id).
      2. Fix it, then run the job now:
         `gcloud scheduler jobs run <job> --location=${var.region}`.
      3. One failure followed by a successful retry needs nothing (`gcloud scheduler jobs describe <job>
         --location=${var.region}` shows the last attempt's status).

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

resource "google_monitoring_alert_policy" "batch_failed" {
  project               = var.project_id
  display_name          = "dicomflow: batch failed"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "A batch could not be expanded"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.batch_failed.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
        group_by_fields      = ["metric.label.code"]
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: a batch failed"
    content   = <<-EOT
      **What it means.** A whole batch failed before any series was converted: its source could not be
      listed or read (folder deleted or unshared, Drive access revoked) or its expansion failed on every
      attempt. The `code` label is the failure code; nothing of this batch will run without help.

      **What to do.**
      1. Logs Explorer: `jsonPayload.event="batch_failed"`: the entry's `batch_id` label and its message
         (a plain-language reason).
      2. `GET /batches/BATCH_ID` or `dicomflow status BATCH_ID`: `status = failed` and `failure.reason`.
      3. Fix the source (share it with `terraform output drive_share_with`, restore the folder) and submit
         the batch again (`dicomflow submit ...`); a new submission with a new Idempotency-Key is needed.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

resource "google_monitoring_alert_policy" "channel_renewal" {
  project               = var.project_id
  display_name          = "dicomflow: Drive channel renewal failed"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "A Drive watch channel could not be renewed"
    condition_threshold {
      filter          = "metric.type=\"${local.user_metric}/${google_logging_metric.channel_renewal_failed.name}\" AND resource.type=\"cloud_run_revision\""
      comparison      = "COMPARISON_GT"
      threshold_value = 0
      duration        = "0s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_SUM"
        cross_series_reducer = "REDUCE_SUM"
      }
      trigger {
        count = 1
      }
    }
  }

  alert_strategy {
    auto_close = "86400s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: a Drive watch channel could not be renewed"
    content   = <<-EOT
      **What it means.** The daily renewal could not re-create a Drive changes channel. When the old
      channel expires, Drive stops sending push notifications and new exams in watched folders are no
      longer converted automatically (nothing already queued is affected).

      **What to do.**
      1. Logs Explorer: `jsonPayload.event="channel_renewal_failed"` — the message says why (Drive
         access lost, OAuth token revoked or expired, webhook URL rejected by Drive, quota).
      2. Fix the cause (re-share, `dicomflow auth` + a new version of the Drive OAuth token secret),
         then run the renewal now:
         `gcloud scheduler jobs run ${local.functions.renew.name} --location=${var.region}`.
      3. `dicomflow watch list` shows each watch and its channel expiry.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }

  depends_on = [time_sleep.log_metrics_propagation]
}

# --- dashboard --------------------------------------------------------------------------------------------

locals {
  dashboard_series_filter = "resource.type=\"cloud_run_revision\""
  worker_filter           = "resource.type=\"cloud_run_revision\" AND resource.label.service_name=\"${local.worker_name}\""
  queues_filter           = "resource.type=\"cloud_tasks_queue\" AND resource.label.queue_id=starts_with(\"${var.name_prefix}-\")"

  dashboard_tiles = [
    {
      title = "Series finished per minute, by outcome"
      datasets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.series_finished.name}\" AND ${local.dashboard_series_filter}"
        aligner = "ALIGN_RATE", reducer = "REDUCE_SUM", group_by = ["metric.label.outcome"], period = "60s", plot = "STACKED_BAR", legend = "$${metric.label.outcome}"
      }]
      y_label = "series/s"
    },
    {
      title = "Attempt failures (retried) and dead letters, by code"
      datasets = [
        {
          filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.series_attempt_failed.name}\" AND ${local.dashboard_series_filter}"
          aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.code"], period = "300s", plot = "STACKED_BAR", legend = "retry: $${metric.label.code}"
        },
        {
          filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.series_dead_lettered.name}\" AND ${local.dashboard_series_filter}"
          aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.code"], period = "300s", plot = "STACKED_BAR", legend = "dead letter: $${metric.label.code}"
        },
      ]
      y_label = "per 5 min"
    },
    {
      title = "Queue depth (tasks waiting or running), by queue"
      datasets = [{
        filter  = "metric.type=\"cloudtasks.googleapis.com/queue/depth\" AND ${local.queues_filter}"
        aligner = "ALIGN_MEAN", reducer = "REDUCE_SUM", group_by = ["resource.label.queue_id"], period = "60s", plot = "LINE", legend = "$${resource.label.queue_id}"
      }]
      y_label = "tasks"
    },
    {
      title = "Task dispatch delay p50 / p99 (age of waiting tasks), by queue"
      datasets = [
        {
          filter  = "metric.type=\"cloudtasks.googleapis.com/queue/task_attempt_delays\" AND ${local.queues_filter}"
          aligner = "ALIGN_DELTA", reducer = "REDUCE_PERCENTILE_50", group_by = ["resource.label.queue_id"], period = "300s", plot = "LINE", legend = "p50 $${resource.label.queue_id}"
        },
        {
          filter  = "metric.type=\"cloudtasks.googleapis.com/queue/task_attempt_delays\" AND ${local.queues_filter}"
          aligner = "ALIGN_DELTA", reducer = "REDUCE_PERCENTILE_99", group_by = ["resource.label.queue_id"], period = "300s", plot = "LINE", legend = "p99 $${resource.label.queue_id}"
        },
      ]
      y_label = "ms"
    },
    {
      title = "Conversion time (dcm2niix) p50 / p95 / p99"
      datasets = [
        for p in ["50", "95", "99"] : {
          filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.convert_seconds.name}\" AND ${local.dashboard_series_filter}"
          aligner = "ALIGN_DELTA", reducer = "REDUCE_PERCENTILE_${p}", group_by = [], period = "300s", plot = "LINE", legend = "p${p}"
        }
      ]
      y_label = "seconds"
    },
    {
      title = "Task attempts by status, by queue (OK = 2xx; UNAVAILABLE = 503, a retry; anything else: see the alerts)"
      datasets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.task_attempts.name}\" AND resource.type=\"cloud_tasks_queue\""
        aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.queue", "metric.label.status"], period = "300s", plot = "STACKED_BAR", legend = "$${metric.label.queue} $${metric.label.status}"
      }]
      y_label = "attempts per 5 min"
    },
    {
      title = "Worker instances, by state"
      datasets = [{
        filter  = "metric.type=\"run.googleapis.com/container/instance_count\" AND ${local.worker_filter}"
        aligner = "ALIGN_MAX", reducer = "REDUCE_SUM", group_by = ["metric.label.state"], period = "60s", plot = "STACKED_AREA", legend = "$${metric.label.state}"
      }]
      y_label = "instances"
    },
    {
      title = "Worker responses per second, by class"
      datasets = [{
        filter  = "metric.type=\"run.googleapis.com/request_count\" AND ${local.worker_filter}"
        aligner = "ALIGN_RATE", reducer = "REDUCE_SUM", group_by = ["metric.label.response_code_class"], period = "60s", plot = "STACKED_BAR", legend = "$${metric.label.response_code_class}"
      }]
      y_label = "requests/s"
    },
    {
      title = "Batches finished, by status (failed = expansion failed)"
      datasets = [
        {
          filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.batch_completed.name}\" AND ${local.dashboard_series_filter}"
          aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.status"], period = "3600s", plot = "STACKED_BAR", legend = "$${metric.label.status}"
        },
        {
          filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.batch_failed.name}\" AND ${local.dashboard_series_filter}"
          aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.code"], period = "3600s", plot = "STACKED_BAR", legend = "failed: $${metric.label.code}"
        },
      ]
      y_label = "batches/hour"
    },
    {
      title = "Scheduler job failures (reconcile, renew)"
      datasets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.scheduler_job_failed.name}\" AND resource.type=\"cloud_scheduler_job\""
        aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.job"], period = "3600s", plot = "STACKED_BAR", legend = "$${metric.label.job}"
      }]
      y_label = "failures/hour"
    },
  ]

  # Full-width log panels under the charts: the entries an operator acts on, with their labels
  # (batch_id, item_id) and plain-language reasons. Log panels read entries directly, not metrics.
  dashboard_log_panels = [
    {
      title  = "Dead letters (labels: batch_id, item_id; redrive with POST /batches/{batch_id}:retry-dead-letters)"
      filter = "${local.log_scope} AND jsonPayload.event=\"series_dead_lettered\""
    },
    {
      title  = "Failed batches"
      filter = "${local.log_scope} AND jsonPayload.event=\"batch_failed\""
    },
    {
      title  = "Task attempts that did not answer 2xx"
      filter = "logName=\"projects/${var.project_id}/logs/cloudtasks.googleapis.com%2Ftask_operations_log\" AND resource.labels.queue_id=~\"^${var.name_prefix}-\" AND jsonPayload.attemptResponseLog.status:* AND NOT jsonPayload.attemptResponseLog.status=\"OK\""
    },
  ]
  dashboard_chart_rows = ceil(length(local.dashboard_tiles) / 2)
}

resource "google_monitoring_dashboard" "main" {
  project = var.project_id
  dashboard_json = jsonencode({
    displayName = "dicomflow (${var.name_prefix})"
    mosaicLayout = {
      columns = 48
      tiles = concat(
        [{
          xPos   = 0
          yPos   = 0
          width  = 48
          height = 6
          widget = {
            title = "How to read this dashboard"
            text = {
              format  = "MARKDOWN"
              content = "Throughput and failures come from dicomflow's structured log events (log-based metrics `${var.name_prefix}/*`); task attempts from Cloud Tasks' own attempt logs. Queue charts cover the ${var.name_prefix}-* Cloud Tasks queues: a growing **convert** depth with flat throughput means the worker is the bottleneck; attempts that are not OK say why (see the alerts' runbooks). The log panels at the bottom list dead letters and failed batches with their batch ids. Per-series details live in Firestore (`batches/{id}/items`). Runbook: docs/operations.md."
            }
          }
        }],
        [
          for i, tile in local.dashboard_tiles : {
            xPos   = (i % 2) * 24
            yPos   = 6 + floor(i / 2) * 16
            width  = 24
            height = 16
            widget = {
              title = tile.title
              xyChart = {
                dataSets = [
                  for ds in tile.datasets : {
                    plotType       = ds.plot
                    legendTemplate = ds.legend
                    timeSeriesQuery = {
                      timeSeriesFilter = {
                        filter = ds.filter
                        aggregation = {
                          alignmentPeriod    = ds.period
                          perSeriesAligner   = ds.aligner
                          crossSeriesReducer = ds.reducer
                          groupByFields      = ds.group_by
                        }
                      }
                    }
                  }
                ]
                yAxis = {
                  label = tile.y_label
                  scale = "LINEAR"
                }
              }
            }
          }
        ],
        [
          for i, panel in local.dashboard_log_panels : {
            xPos   = 0
            yPos   = 6 + local.dashboard_chart_rows * 16 + i * 16
            width  = 48
            height = 16
            widget = {
              title = panel.title
              logsPanel = {
                filter        = panel.filter
                resourceNames = ["projects/${var.project_id}"]
              }
            }
          }
        ],
      )
    }
  })

  depends_on = [google_project_service.this]
}
