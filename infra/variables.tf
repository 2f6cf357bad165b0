# Inputs of the dicomflow deployment. Every variable has a type and a description; enums and ranges are
# validated here so that a bad value fails at plan time, not halfway through an apply.

# --- project and naming -----------------------------------------------------------------------------------

variable "project_id" {
  description = "Google Cloud project id that hosts dicomflow (queues, services, Firestore, monitoring)."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{4,28}[a-z0-9]$", var.project_id))
    error_message = "project_id must be a Google Cloud project id: 6-30 lowercase letters, digits or hyphens."
  }
}

variable "region" {
  description = "Region of the Cloud Run worker, the functions, the Cloud Tasks queues and the scheduler jobs."
  type        = string
  default     = "europe-west1"

  validation {
    condition     = length(trimspace(var.region)) > 0 && can(regex("^[a-z]+-[a-z]+[0-9]+$", var.region))
    error_message = "region must be a non-empty Google Cloud region name such as europe-west1."
  }
}

variable "name_prefix" {
  description = "Prefix of every resource name (queues, services, functions, service accounts, secrets). Keep it short: service account ids are limited to 30 characters."
  type        = string
  default     = "dicomflow"

  validation {
    # "<prefix>-fn-dead-letter" is the longest service account id and must fit in 30 characters.
    condition     = can(regex("^[a-z][a-z0-9-]{1,13}[a-z0-9]$", var.name_prefix))
    error_message = "name_prefix must be 3-15 lowercase letters, digits or hyphens, starting with a letter."
  }
}

variable "labels" {
  description = "Labels added to every resource that supports them (provider default_labels)."
  type        = map(string)
  default     = { app = "dicomflow" }

  validation {
    condition     = alltrue([for k, v in var.labels : can(regex("^[a-z][a-z0-9_-]{0,62}$", k)) && can(regex("^[a-z0-9_-]{0,63}$", v))])
    error_message = "label keys must start with a lowercase letter; keys and values may hold lowercase letters, digits, _ and - (max 63)."
  }
}

variable "deletion_protection" {
  description = "Protect stateful and hard-to-recreate resources (Firestore database, Cloud Run worker, secrets, source bucket) from terraform destroy. Set to false only for throw-away environments."
  type        = bool
  default     = true
}

# --- worker (Cloud Run) -----------------------------------------------------------------------------------

variable "image" {
  description = "Worker container image built by container/cloudbuild.yaml, BY DIGEST: REGION-docker.pkg.dev/PROJECT/NAME_PREFIX/worker@sha256:<64 hex>. A tag can be moved or re-pushed; a digest names exactly the image that was built and tested, so a revision can always be redeployed or rolled back to the same bits."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9.-]+(:[0-9]+)?/[^@\\s]+@sha256:[0-9a-f]{64}$", var.image))
    error_message = "image must be a digest reference (HOST/PATH@sha256:<64 lowercase hex>), e.g. the IMAGE_DIGEST printed by `gcloud builds submit --config container/cloudbuild.yaml`; tags are not accepted."
  }
}

variable "worker_cpu" {
  description = "vCPUs of one worker instance (Cloud Run CPU limit). dcm2niix is mostly single-threaded, but gzip, downloads and uploads overlap."
  type        = string
  default     = "2"

  validation {
    condition     = contains(["1", "2", "4", "6", "8"], var.worker_cpu)
    error_message = "worker_cpu must be one of 1, 2, 4, 6, 8 (Cloud Run CPU limits; below 1 vCPU would cap memory at 512 MiB)."
  }
}

variable "worker_memory_mib" {
  description = "Memory of one worker instance in MiB. Cloud Run's /tmp is RAM: size it at 2-3x the largest series (download + dcm2niix output). Also passed to the worker as DICOMFLOW_MEMORY_BUDGET_MB so too-large series are refused before download."
  type        = number
  default     = 8192

  validation {
    # https://cloud.google.com/run/docs/configuring/services/memory-limits: 512 MiB .. 32 GiB.
    condition     = var.worker_memory_mib >= 512 && var.worker_memory_mib <= 32768 && floor(var.worker_memory_mib) == var.worker_memory_mib
    error_message = "worker_memory_mib must be a whole number between 512 and 32768 (Cloud Run's limits)."
  }
}

variable "worker_max_instances" {
  description = "Most worker instances at once (each converts one series at a time). This bounds parallel Drive downloads/uploads and so protects the Drive API per-user quotas; it is also the default concurrency of the convert queue."
  type        = number
  default     = 10

  validation {
    condition     = var.worker_max_instances >= 1 && var.worker_max_instances <= 1000 && floor(var.worker_max_instances) == var.worker_max_instances
    error_message = "worker_max_instances must be a whole number between 1 and 1000."
  }
}

variable "worker_ingress" {
  description = "Network ingress of the worker. Invocation is protected by IAM either way (only the tasks service account is a run.invoker); Cloud Tasks in the same project counts as internal traffic when it calls the run.app URL."
  type        = string
  default     = "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"

  validation {
    condition     = contains(["INGRESS_TRAFFIC_ALL", "INGRESS_TRAFFIC_INTERNAL_ONLY", "INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER"], var.worker_ingress)
    error_message = "worker_ingress must be INGRESS_TRAFFIC_ALL, INGRESS_TRAFFIC_INTERNAL_ONLY or INGRESS_TRAFFIC_INTERNAL_LOAD_BALANCER."
  }
}

variable "dispatch_deadline_seconds" {
  description = "Cloud Tasks dispatch deadline of convert tasks, in seconds; also the worker's request timeout. dcm2niix is stopped 300 s before it (DICOMFLOW_CONVERT_TIMEOUT_SECONDS) so an attempt always answers before Cloud Tasks gives up on it."
  type        = number
  default     = 1800

  validation {
    # Cloud Tasks accepts [15 s, 30 min] for HTTP targets (GCP_FACTS §4).
    condition     = var.dispatch_deadline_seconds >= 15 && var.dispatch_deadline_seconds <= 1800 && floor(var.dispatch_deadline_seconds) == var.dispatch_deadline_seconds
    error_message = "dispatch_deadline_seconds must be a whole number between 15 and 1800 (Cloud Tasks limits)."
  }
}

variable "log_level" {
  description = "Log level of the worker and the functions (DICOMFLOW_LOG_LEVEL)."
  type        = string
  default     = "INFO"

  validation {
    condition     = contains(["DEBUG", "INFO", "WARNING", "ERROR"], var.log_level)
    error_message = "log_level must be DEBUG, INFO, WARNING or ERROR."
  }
}

# --- Cloud Tasks ------------------------------------------------------------------------------------------

variable "convert_retry" {
  description = "RetryConfig of the convert queue AND the worker's idea of the last attempt (DICOMFLOW_RETRY_*): one variable feeds both, so they cannot drift (DESIGN.md invariant 5). The default equals dicomflow.domain.retry.RetryPolicy(); tests/infra compares them. Backoffs are whole seconds because Cloud Tasks truncates them."
  type = object({
    max_attempts        = number
    min_backoff_seconds = number
    max_backoff_seconds = number
    max_doublings       = number
  })
  default = {
    max_attempts        = 5
    min_backoff_seconds = 10.0
    max_backoff_seconds = 600.0
    max_doublings       = 4
  }

  validation {
    condition     = var.convert_retry.max_attempts >= 1 && var.convert_retry.max_attempts <= 100 && floor(var.convert_retry.max_attempts) == var.convert_retry.max_attempts
    error_message = "convert_retry.max_attempts must be a whole number between 1 and 100 (-1, unlimited, would never dead-letter)."
  }

  validation {
    condition     = var.convert_retry.min_backoff_seconds >= 0 && var.convert_retry.max_backoff_seconds >= var.convert_retry.min_backoff_seconds && floor(var.convert_retry.min_backoff_seconds) == var.convert_retry.min_backoff_seconds && floor(var.convert_retry.max_backoff_seconds) == var.convert_retry.max_backoff_seconds
    error_message = "convert_retry backoffs must be whole seconds with 0 <= min_backoff_seconds <= max_backoff_seconds."
  }

  validation {
    condition     = var.convert_retry.max_doublings >= 0 && var.convert_retry.max_doublings <= 16 && floor(var.convert_retry.max_doublings) == var.convert_retry.max_doublings
    error_message = "convert_retry.max_doublings must be a whole number between 0 and 16."
  }
}

variable "convert_max_dispatches_per_second" {
  description = "Rate limit of the convert queue (tasks started per second). Cloud Tasks allows at most 500."
  type        = number
  default     = 5

  validation {
    condition     = var.convert_max_dispatches_per_second > 0 && var.convert_max_dispatches_per_second <= 500
    error_message = "convert_max_dispatches_per_second must be greater than 0 and at most 500."
  }
}

variable "convert_max_concurrent_dispatches" {
  description = "Most convert tasks in flight at once. null (the default) means worker_max_instances: one task per worker instance, so Cloud Run never answers 429 for lack of instances."
  type        = number
  default     = null

  validation {
    condition     = var.convert_max_concurrent_dispatches == null ? true : (var.convert_max_concurrent_dispatches >= 1 && var.convert_max_concurrent_dispatches <= 5000)
    error_message = "convert_max_concurrent_dispatches must be null or between 1 and 5000 (Cloud Tasks limit)."
  }
}

variable "control_max_dispatches_per_second" {
  description = "Rate limit of the expand, dead-letter and changes queues (short, idempotent handler tasks). Cloud Tasks allows at most 500."
  type        = number
  default     = 20

  validation {
    condition     = var.control_max_dispatches_per_second > 0 && var.control_max_dispatches_per_second <= 500
    error_message = "control_max_dispatches_per_second must be greater than 0 and at most 500."
  }
}

variable "control_max_concurrent_dispatches" {
  description = "Most tasks in flight at once on each of the expand, dead-letter and changes queues. Keep it at or below functions_max_instances."
  type        = number
  default     = 20

  validation {
    condition     = var.control_max_concurrent_dispatches >= 1 && var.control_max_concurrent_dispatches <= 5000
    error_message = "control_max_concurrent_dispatches must be between 1 and 5000 (Cloud Tasks limit)."
  }
}

variable "tasks_logging_sampling_ratio" {
  description = "Fraction of task attempts Cloud Tasks writes to Cloud Logging (stackdriver_logging_config), on every queue. The task-attempt metric, its alerts (stalled conversion diagnosis, rejected attempts, failing convert attempts) and the dashboard's attempts chart are built on these logs: 1.0 logs every attempt; lower values scale the counts down and can hide a rare rejection."
  type        = number
  default     = 1.0

  validation {
    condition     = var.tasks_logging_sampling_ratio > 0 && var.tasks_logging_sampling_ratio <= 1
    error_message = "tasks_logging_sampling_ratio must be in (0, 1]: with 0 Cloud Tasks logs no attempt and the attempt alerts go silent."
  }
}

# --- functions --------------------------------------------------------------------------------------------

variable "functions_source_zip" {
  description = "Path of the functions source archive built by `make dist`, relative to the directory terraform runs in (infra/). The object name carries the archive's MD5, so a new archive redeploys every function."
  type        = string
  default     = "../dist/functions-source.zip"

  validation {
    condition     = endswith(var.functions_source_zip, ".zip")
    error_message = "functions_source_zip must point at a .zip archive (run `make dist`)."
  }
}

variable "functions_max_instances" {
  description = "Most instances of each function (each handles one request at a time)."
  type        = number
  default     = 20

  validation {
    condition     = var.functions_max_instances >= 1 && var.functions_max_instances <= 1000 && floor(var.functions_max_instances) == var.functions_max_instances
    error_message = "functions_max_instances must be a whole number between 1 and 1000."
  }
}

variable "task_functions_ingress" {
  description = "Ingress of the functions invoked only by Cloud Tasks or Cloud Scheduler (expand, dead-letter, changes, reconcile, renew). ALLOW_ALL relies on IAM alone; ALLOW_INTERNAL_ONLY also blocks the internet but is only documented for requests to run.app URLs, while dicomflow targets the cloudfunctions.net URL — verify before switching. The batches API and the Drive webhook are always ALLOW_ALL."
  type        = string
  default     = "ALLOW_ALL"

  validation {
    condition     = contains(["ALLOW_ALL", "ALLOW_INTERNAL_ONLY", "ALLOW_INTERNAL_AND_GCLB"], var.task_functions_ingress)
    error_message = "task_functions_ingress must be ALLOW_ALL, ALLOW_INTERNAL_ONLY or ALLOW_INTERNAL_AND_GCLB."
  }
}

variable "submitters" {
  description = "Principals allowed to call the batches API (roles/run.invoker on the batches function), e.g. [\"group:imaging@example.org\", \"user:alice@example.org\"]."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for m in var.submitters : can(regex("^(user|group|serviceAccount|domain):[^\\s]+$", m))])
    error_message = "every submitter must start with user:, group:, serviceAccount: or domain:."
  }
}

# --- access (issue 11; docs/operations.md "Users, roots and limits") ----------------------------------------

variable "admins" {
  description = "E-mails of administrators (users, or groups listed in access_groups): they see, cancel and retry every batch and watch. Everyone else sees only their own."
  type        = list(string)
  default     = []

  validation {
    condition     = alltrue([for a in var.admins : can(regex("^[^@\\s]+@[^@\\s]+$", a))])
    error_message = "admins must be e-mail addresses."
  }
}

variable "access_grants" {
  description = "Per submitter (user or group e-mail): the Drive folders (drive://FOLDER_ID) inside which their sources and destinations must lie, and optional limits overriding the defaults. Submitters also need var.submitters (IAM) to reach the API at all."
  type = map(object({
    roots                  = list(string)
    max_unfinished_batches = optional(number)
    max_batch_files        = optional(number)
    max_batch_bytes        = optional(number)
  }))
  default = {}

  validation {
    condition     = alltrue([for k, g in var.access_grants : can(regex("^[^@\\s]+@[^@\\s]+$", k)) && alltrue([for r in g.roots : can(regex("^drive://[A-Za-z0-9_-]{10,200}$", r))])])
    error_message = "access_grants keys must be e-mails and roots must be drive://FOLDER_ID."
  }
}

variable "access_groups" {
  description = "Group e-mail -> member e-mails, as dicomflow sees groups in access_grants and admins. ID tokens carry no group claims and the functions do not query Google Groups: keep this in step with the real groups (IAM resolves groups in var.submitters by itself)."
  type        = map(list(string))
  default     = {}
}

variable "max_unfinished_batches" {
  description = "Default limit of unfinished batches per submitter (0 = none)."
  type        = number
  default     = 10

  validation {
    condition     = var.max_unfinished_batches >= 0 && floor(var.max_unfinished_batches) == var.max_unfinished_batches
    error_message = "max_unfinished_batches must be a whole number >= 0."
  }
}

variable "max_batch_files" {
  description = "Default limit of files one batch may list (0 = none); a larger source fails while it is listed."
  type        = number
  default     = 0

  validation {
    condition     = var.max_batch_files >= 0 && floor(var.max_batch_files) == var.max_batch_files
    error_message = "max_batch_files must be a whole number >= 0."
  }
}

variable "max_batch_bytes" {
  description = "Default limit of bytes one batch may list (0 = none)."
  type        = number
  default     = 0

  validation {
    condition     = var.max_batch_bytes >= 0 && floor(var.max_batch_bytes) == var.max_batch_bytes
    error_message = "max_batch_bytes must be a whole number >= 0."
  }
}

variable "api_extra_audiences" {
  description = "ID-token audiences the batch API accepts besides its own URL (e.g. a custom domain; or the client id of gcloud's user tokens, 32555940559.apps.googleusercontent.com, if people call it with plain `gcloud auth print-identity-token` — any token gcloud minted for that user then works here)."
  type        = list(string)
  default     = []
}

variable "settle_seconds" {
  description = "A watched Drive folder is converted once nothing in it has changed for this many seconds (DICOMFLOW_SETTLE_SECONDS)."
  type        = number
  default     = 300

  validation {
    condition     = var.settle_seconds >= 0 && var.settle_seconds <= 86400
    error_message = "settle_seconds must be between 0 and 86400."
  }
}

# --- Google Drive -----------------------------------------------------------------------------------------

variable "drive_user_oauth" {
  description = "Act on Drive as a user (OAuth token in Secret Manager, mounted at /secrets/drive/token.json) instead of as the service accounts. Needed to write into My Drive folders: service accounts have no Drive storage quota."
  type        = bool
  default     = false
}

variable "drive_user_email" {
  description = "E-mail of the Drive user whose token is stored when drive_user_oauth is true; shown in error messages (DICOMFLOW_DRIVE_IDENTITY). Ignored otherwise."
  type        = string
  default     = ""

  validation {
    condition     = var.drive_user_email == "" || can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.drive_user_email))
    error_message = "drive_user_email must be empty or an e-mail address."
  }
}

# --- Firestore --------------------------------------------------------------------------------------------

variable "firestore_database" {
  description = "Firestore database id (DICOMFLOW_FIRESTORE_DATABASE). \"(default)\" or a named database."
  type        = string
  default     = "(default)"

  validation {
    condition     = var.firestore_database == "(default)" || can(regex("^[a-z][a-z0-9-]{2,61}[a-z0-9]$", var.firestore_database))
    error_message = "firestore_database must be \"(default)\" or 4-63 lowercase letters, digits or hyphens starting with a letter."
  }
}

variable "firestore_location" {
  description = "Firestore location (a region such as europe-west1 or a multi-region such as eur3). null means var.region."
  type        = string
  default     = null
}

variable "firestore_point_in_time_recovery" {
  description = "Keep 7 days of Firestore versions for point-in-time recovery (extra storage cost)."
  type        = bool
  default     = true
}

# --- scheduler --------------------------------------------------------------------------------------------

variable "reconcile_schedule" {
  description = "Cron schedule of the reconciler (finds series left running by a crash, lost tasks, stalled expansions)."
  type        = string
  default     = "*/10 * * * *"

  validation {
    condition     = length(split(" ", trimspace(var.reconcile_schedule))) == 5
    error_message = "reconcile_schedule must be a 5-field cron expression."
  }
}

variable "renew_channels_schedule" {
  description = "Cron schedule of the Drive watch-channel renewal (channels last at most a week and are renewed 2 days before they expire)."
  type        = string
  default     = "17 3 * * *"

  validation {
    condition     = length(split(" ", trimspace(var.renew_channels_schedule))) == 5
    error_message = "renew_channels_schedule must be a 5-field cron expression."
  }
}

variable "scheduler_time_zone" {
  description = "Time zone (tz database name) of the scheduler jobs."
  type        = string
  default     = "Etc/UTC"

  validation {
    condition     = length(trimspace(var.scheduler_time_zone)) > 0
    error_message = "scheduler_time_zone must be a tz database name such as Etc/UTC or Europe/Paris."
  }
}

# --- alerts -----------------------------------------------------------------------------------------------

variable "alert_email" {
  description = "E-mail address that receives dicomflow alerts (dead letters, failure rate, stalls, failing task attempts, function 5xx, scheduler failures, failed batches, channel renewal failures)."
  type        = string

  validation {
    condition     = can(regex("^[^@\\s]+@[^@\\s]+\\.[^@\\s]+$", var.alert_email))
    error_message = "alert_email must be an e-mail address."
  }
}

variable "failure_rate_threshold" {
  description = "Alert when more than this fraction of the series finished in the last 30 minutes were dead-lettered."
  type        = number
  default     = 0.1

  validation {
    condition     = var.failure_rate_threshold > 0 && var.failure_rate_threshold < 1
    error_message = "failure_rate_threshold must be strictly between 0 and 1."
  }
}

variable "failure_rate_min_series" {
  description = "The failure-rate alert needs at least this many finished series in the 30-minute window, so one failure out of two does not page anyone (single dead letters have their own alert)."
  type        = number
  default     = 10

  validation {
    condition     = var.failure_rate_min_series >= 1
    error_message = "failure_rate_min_series must be at least 1."
  }
}

variable "stall_alert_minutes" {
  description = "Alert when convert tasks have been waiting for this many minutes while no series finished (succeeded or dead-lettered): the pipeline is stuck, whatever the batch size. Keep it above the longest conversion you expect (a single series that takes 40 minutes finishes nothing for 40 minutes)."
  type        = number
  default     = 45

  validation {
    # A condition's duration must be a whole number of minutes (Monitoring API, MetricThreshold.duration).
    condition     = var.stall_alert_minutes >= 10 && var.stall_alert_minutes <= 1440 && floor(var.stall_alert_minutes) == var.stall_alert_minutes
    error_message = "stall_alert_minutes must be a whole number between 10 and 1440."
  }
}

variable "convert_attempt_failure_ratio" {
  description = "Alert when more than this fraction of convert task attempts in 15 minutes did not answer 2xx (Cloud Tasks' own log of each attempt, so attempts Cloud Run refused count too). Some are normal: a transient failure answers 503 so Cloud Tasks retries."
  type        = number
  default     = 0.25

  validation {
    condition     = var.convert_attempt_failure_ratio > 0 && var.convert_attempt_failure_ratio <= 1
    error_message = "convert_attempt_failure_ratio must be in (0, 1]."
  }
}

variable "log_metric_propagation_seconds" {
  description = "Seconds Terraform waits after creating or changing log-based metrics before creating the alert policies that use them. Cloud Monitoring answers 404 for a log-based metric until it has propagated, up to about 10 minutes (hashicorp/terraform-provider-google#11102). The wait happens only when the set of metrics changes."
  type        = number
  default     = 600

  validation {
    condition     = var.log_metric_propagation_seconds >= 0 && var.log_metric_propagation_seconds <= 1800 && floor(var.log_metric_propagation_seconds) == var.log_metric_propagation_seconds
    error_message = "log_metric_propagation_seconds must be a whole number between 0 and 1800."
  }
}

# --- retention --------------------------------------------------------------------------------------------

variable "retention_days" {
  description = "Batches and their series (Firestore batches/{id} and batches/{id}/items/{id}) are deleted this many days after they finish, by Firestore TTL on `expires_at` (DICOMFLOW_RETENTION_DAYS). Deletion happens typically within 24 hours after that."
  type        = number
  default     = 30

  validation {
    # The same range as dicomflow.config (retention_days).
    condition     = var.retention_days >= 1 && var.retention_days <= 3650 && floor(var.retention_days) == var.retention_days
    error_message = "retention_days must be a whole number between 1 and 3650."
  }
}
