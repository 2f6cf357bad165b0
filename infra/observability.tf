# Log-based metrics, alert policies and the dashboard.
#
# Every dicomflow log line is one JSON object (DICOMFLOW_LOG_FORMAT=json); its `event` field is one of
# dicomflow.events.Event and the metrics below count those events. tests/infra checks that every
# jsonPayload.event named here is an Event member that the code really logs, and that every extracted
# field (convert_seconds, status, code, event) is a field the code logs.
#
# Assumption (not verifiable offline): Cloud Functions gen2 write their logs as resource.type
# "cloud_run_revision" with resource.labels.service_name = the function name, like the worker. The scope
# below therefore covers the worker and every function of this deployment, and nothing else.

locals {
  log_scope   = "resource.type=\"cloud_run_revision\" AND resource.labels.service_name=~\"^${var.name_prefix}-\""
  user_metric = "logging.googleapis.com/user"
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

# --- alerting ---------------------------------------------------------------------------------------------

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
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
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
      1. List the failures: `dicomflow dlq list BATCH_ID`, or `GET /batches/BATCH_ID` (field `failures`),
         or the Firestore documents `batches/BATCH_ID/items/*` with `state = dead_lettered`
         (`failure.code`, `failure.reason`).
      2. Fix what the reason says (share the folder with the Drive identity, free Drive space, raise
         `worker_memory_mib` for "too large" series, ...).
      3. Redrive: `POST /batches/BATCH_ID:retry-dead-letters` or `dicomflow dlq retry BATCH_ID`.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }
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
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
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
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
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
      1. Dashboard "dicomflow": which failure codes dominate ("Attempt failures by code").
      2. Logs Explorer: `jsonPayload.event="series_dead_lettered"` — read `jsonPayload.code` and the
         message (a plain-language reason).
      3. Fix the common cause (roll back `var.image`, re-share the folder, renew the OAuth token, raise
         memory), then redrive each affected batch: `dicomflow dlq retry BATCH_ID` or
         `POST /batches/BATCH_ID:retry-dead-letters`.
      4. To stop the damage first: `gcloud tasks queues pause ${local.queue_ids.convert} --location=${var.region}`
         (resume with `gcloud tasks queues resume`).

      Runbook: docs/operations.md, "Alerts".
    EOT
  }
}

# Cloud Tasks publishes no "oldest task age" metric. Assumption: the closest one is
# cloudtasks.googleapis.com/queue/task_attempt_delays (distribution, ms: delay between the time an
# attempt was scheduled and the time it was dispatched), on the cloud_tasks_queue resource. Its 99th
# percentile says how long the oldest waiting tasks have been kept waiting. A paused or stuck queue that
# dispatches nothing produces no data: queue/depth on the dashboard shows that case.
resource "google_monitoring_alert_policy" "convert_queue_delay" {
  project               = var.project_id
  display_name          = "dicomflow: convert tasks waiting too long"
  combiner              = "OR"
  severity              = "WARNING"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "p99 dispatch delay of ${local.queue_ids.convert} > ${var.queue_delay_alert_minutes} min"
    condition_threshold {
      filter          = "metric.type=\"cloudtasks.googleapis.com/queue/task_attempt_delays\" AND resource.type=\"cloud_tasks_queue\" AND resource.label.queue_id=\"${google_cloud_tasks_queue.convert.name}\""
      comparison      = "COMPARISON_GT"
      threshold_value = var.queue_delay_alert_minutes * 60 * 1000
      duration        = "600s"
      aggregations {
        alignment_period     = "300s"
        per_series_aligner   = "ALIGN_DELTA"
        cross_series_reducer = "REDUCE_PERCENTILE_99"
      }
      trigger {
        count = 1
      }
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: convert queue backlog is old"
    content   = <<-EOT
      **What it means.** Convert tasks start more than ${var.queue_delay_alert_minutes} minutes after
      they were due. Either the backlog is simply large (a big batch: tasks wait their turn behind
      `worker_max_instances` parallel conversions), or dispatch is throttled: the worker answers 429/503
      or many 5xx, Cloud Run cannot start instances, or the queue is paused.

      **What to do.**
      1. Dashboard "dicomflow": queue depth, worker instance count and worker responses by class.
      2. `gcloud tasks queues describe ${local.queue_ids.convert} --location=${var.region}`: state RUNNING?
         rate limits as expected?
      3. If the worker is healthy and simply busy, either wait, or raise `worker_max_instances`
         (watch Drive quotas) and `queue_delay_alert_minutes` for batches of this size.
      4. If the worker errors, see the "worker 5xx" runbook.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }
}

resource "google_monitoring_alert_policy" "worker_errors" {
  project               = var.project_id
  display_name          = "dicomflow: worker 5xx rate"
  combiner              = "OR"
  severity              = "ERROR"
  notification_channels = [google_monitoring_notification_channel.email.id]

  conditions {
    display_name = "5xx / all requests of ${local.worker_name} > ${var.worker_5xx_ratio_threshold} over 15 minutes"
    condition_threshold {
      filter             = "metric.type=\"run.googleapis.com/request_count\" AND resource.type=\"cloud_run_revision\" AND resource.label.service_name=\"${google_cloud_run_v2_service.worker.name}\" AND metric.label.response_code_class=\"5xx\""
      denominator_filter = "metric.type=\"run.googleapis.com/request_count\" AND resource.type=\"cloud_run_revision\" AND resource.label.service_name=\"${google_cloud_run_v2_service.worker.name}\""
      comparison         = "COMPARISON_GT"
      threshold_value    = var.worker_5xx_ratio_threshold
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
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
    }
  }

  alert_strategy {
    auto_close = "3600s"
  }

  documentation {
    mime_type = "text/markdown"
    subject   = "dicomflow: the worker is failing requests"
    content   = <<-EOT
      **What it means.** More than ${var.worker_5xx_ratio_threshold * 100} % of the worker's requests in
      15 minutes answered 5xx. A transient failure (Drive rate limit, Drive 5xx, Firestore contention)
      answers 5xx on purpose so Cloud Tasks retries it, so a few are normal; this many means crashes
      (out of memory: Cloud Run logs "Memory limit ... exceeded"), timeouts (504 at the request timeout),
      a bad image, or an outside system that is down.

      **What to do.**
      1. Logs Explorer, resource `cloud_run_revision`, service `${local.worker_name}`, severity >= WARNING:
         `jsonPayload.event="series_attempt_failed"` gives the failure code of each retried attempt.
      2. Out of memory: raise `worker_memory_mib` (and `worker_cpu`, Cloud Run couples them).
         Timeouts: series too large for `dispatch_deadline_seconds`.
         Drive `rateLimitExceeded`: lower `worker_max_instances` or `convert_max_dispatches_per_second`.
         New image: roll back `var.image` to the previous digest and `terraform apply`.
      3. Series are not lost meanwhile: they are retried, then dead-lettered and can be redriven.

      Runbook: docs/operations.md, "Alerts".
    EOT
  }
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
      evaluation_missing_data = "EVALUATION_MISSING_DATA_INACTIVE"
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
      title = "Batches completed, by status"
      datasets = [{
        filter  = "metric.type=\"${local.user_metric}/${google_logging_metric.batch_completed.name}\" AND ${local.dashboard_series_filter}"
        aligner = "ALIGN_SUM", reducer = "REDUCE_SUM", group_by = ["metric.label.status"], period = "3600s", plot = "STACKED_BAR", legend = "$${metric.label.status}"
      }]
      y_label = "batches/hour"
    },
  ]
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
              content = "Throughput and failures come from dicomflow's structured log events (log-based metrics `${var.name_prefix}/*`). Queue charts cover the ${var.name_prefix}-* Cloud Tasks queues: a growing **convert** depth with flat throughput means the worker is the bottleneck (or failing: see responses by class). Per-series details live in Firestore (`batches/{id}/items`). Runbook: docs/operations.md."
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
      )
    }
  })

  depends_on = [google_project_service.this]
}
