# Provider, shared names and the environment every dicomflow process receives.
#
# Settings (src/dicomflow/config.py) read DICOMFLOW_<NAME>; this file is where Terraform decides their
# values for the cloud. Names here are a contract with the code: tests/infra checks that every
# DICOMFLOW_* variable set in infra/ is a real setting and that the retry settings come from
# var.convert_retry (DESIGN.md invariant 5).

provider "google" {
  project        = var.project_id
  region         = var.region
  default_labels = var.labels
}

# The project number is needed for the worker's deterministic run.app URL (see local.worker_self_url).
data "google_project" "this" {
  project_id = var.project_id
}

locals {
  firestore_location = coalesce(var.firestore_location, var.region)

  queue_ids = {
    convert     = "${var.name_prefix}-convert"
    dead_letter = "${var.name_prefix}-dead-letter"
    expand      = "${var.name_prefix}-expand"
    changes     = "${var.name_prefix}-changes"
  }

  # RetryConfig of the expand, dead-letter and changes queues: the numbers of
  # dicomflow.domain.retry.CONTROL_POLICY (their handlers are short and idempotent). Written once here;
  # tests/infra compares them with CONTROL_POLICY.
  control_retry = {
    max_attempts        = 10
    min_backoff_seconds = 5
    max_backoff_seconds = 300
    max_doublings       = 5
  }

  # One convert task in flight per worker instance unless told otherwise.
  convert_max_concurrent_dispatches = coalesce(var.convert_max_concurrent_dispatches, var.worker_max_instances)

  # dcm2niix is stopped 300 s before the dispatch deadline, so the worker still has time to record the
  # failure and answer before Cloud Tasks re-dispatches the attempt (GCP_FACTS gotcha 11). Short
  # deadlines (<= 600 s, tests and experiments) keep half of the deadline instead.
  convert_timeout_seconds = var.dispatch_deadline_seconds > 600 ? var.dispatch_deadline_seconds - 300 : floor(var.dispatch_deadline_seconds / 2)

  worker_name = "${var.name_prefix}-worker"

  # Cloud Run's deterministic URL (https://SERVICE-PROJECT_NUMBER.REGION.run.app). The worker cannot read
  # its own `uri` attribute (a cycle), so it gets this one; everybody else uses the resource's `uri`.
  # Both are URLs of the same service; Cloud Run accepts either as OIDC audience (not verifiable offline).
  worker_self_url = "https://${local.worker_name}-${data.google_project.this.number}.${var.region}.run.app"

  drive_secret_mount = "/secrets/drive"
  drive_token_path   = "${local.drive_secret_mount}/token.json"

  # One Cloud Functions (gen2) function per entry point of functions/main.py, each with its own service
  # account. `invoker` says who may call it; the flags drive the IAM grants in iam.tf:
  #   firestore     roles/datastore.user (reads/writes batches, items, channels, pending folders)
  #   enqueue       queues it creates tasks on (roles/cloudtasks.enqueuer there + actAs on the tasks SA)
  #   drive         talks to the Drive API (gets the user OAuth token when var.drive_user_oauth)
  #   webhook_token needs the Drive channel token (DICOMFLOW_WEBHOOK_TOKEN from Secret Manager)
  #   pseudonym_key reads DICOM headers and names destination folders (DICOMFLOW_PSEUDONYM_KEY, Secret Manager)
  functions = {
    batches = {
      name          = "${var.name_prefix}-batches"
      entry_point   = "batches_api"
      description   = "dicomflow batch API: POST /batches, GET /batches/{id}, :retry-dead-letters, :cancel"
      timeout       = 60
      memory        = "512Mi"
      invoker       = "submitters"
      firestore     = true
      enqueue       = ["expand"] # submit, retry-dead-letters (redrive) and cancel sweeps are expand-queue tasks
      drive         = true       # checks that source and destination folders are reachable
      webhook_token = false
      pseudonym_key = false
    }
    expand = {
      name          = "${var.name_prefix}-expand"
      entry_point   = "expand_task"
      description   = "dicomflow expansion task handler: lists sources, reads DICOM headers, enqueues one convert task per series"
      timeout       = 1800
      memory        = "2Gi"
      invoker       = "tasks"
      firestore     = true
      enqueue       = ["expand", "convert"] # scan chunks -> expand; series -> convert
      drive         = true
      webhook_token = false
      pseudonym_key = true # scans headers (and re-reads series for redrives)
    }
    dead_letter = {
      name          = "${var.name_prefix}-dead-letter"
      entry_point   = "dead_letter_task"
      description   = "dicomflow dead-letter task handler: records a series that will not be retried"
      timeout       = 300
      memory        = "512Mi"
      invoker       = "tasks"
      firestore     = true
      enqueue       = []
      drive         = false
      webhook_token = false
      pseudonym_key = false
    }
    changes = {
      name          = "${var.name_prefix}-changes"
      entry_point   = "drive_changes_task"
      description   = "dicomflow Drive changes task handler: reads the change list, submits settled folders"
      timeout       = 540
      memory        = "1Gi"
      invoker       = "tasks"
      firestore     = true
      enqueue       = ["changes", "expand"] # re-check of unsettled folders -> changes; submit -> expand
      drive         = true
      webhook_token = true
      pseudonym_key = false
    }
    reconcile = {
      name          = "${var.name_prefix}-reconcile"
      entry_point   = "reconcile"
      description   = "dicomflow reconciler: requeues or dead-letters series a crash left behind (Cloud Scheduler)"
      timeout       = 540
      memory        = "512Mi"
      invoker       = "scheduler"
      firestore     = true
      enqueue       = ["convert", "expand"]
      drive         = false
      webhook_token = false
      pseudonym_key = false
    }
    renew = {
      name          = "${var.name_prefix}-renew"
      entry_point   = "renew_channels"
      description   = "dicomflow Drive watch-channel renewal (Cloud Scheduler); also submits folders that went quiet"
      timeout       = 540
      memory        = "512Mi"
      invoker       = "scheduler"
      firestore     = true
      enqueue       = ["expand"] # a settled folder is submitted as a batch
      drive         = true
      webhook_token = true
      pseudonym_key = false
    }
    webhook = {
      name          = "${var.name_prefix}-webhook"
      entry_point   = "drive_webhook"
      description   = "dicomflow Drive push-notification receiver (public; checks the channel token itself)"
      timeout       = 60
      memory        = "256Mi"
      invoker       = "public"
      firestore     = true # looks the channel up
      enqueue       = ["changes"]
      drive         = false
      webhook_token = true
      pseudonym_key = false
    }
  }

  # Function URLs are computed, not read from the resources: a function cannot reference its own `url`
  # (a cycle), and every function needs the others' URLs as task targets.
  function_urls = { for key, fn in local.functions : key => "https://${var.region}-${var.project_id}.cloudfunctions.net/${fn.name}" }

  # Invariant 5: the convert queue's RetryConfig (queues.tf) and these variables come from the same
  # object, var.convert_retry. Every process that decides "last attempt" gets them: the worker, the
  # dead-letter handler, the reconciler (and, harmlessly, the other functions).
  retry_env = {
    DICOMFLOW_RETRY_MAX_ATTEMPTS        = tostring(var.convert_retry.max_attempts)
    DICOMFLOW_RETRY_MIN_BACKOFF_SECONDS = tostring(var.convert_retry.min_backoff_seconds)
    DICOMFLOW_RETRY_MAX_BACKOFF_SECONDS = tostring(var.convert_retry.max_backoff_seconds)
    DICOMFLOW_RETRY_MAX_DOUBLINGS       = tostring(var.convert_retry.max_doublings)
  }

  # Dispatch deadlines (GCP_FACTS gotcha 23): a task that does not set one gets Cloud Tasks' default of
  # 10 minutes, so a handler allowed 30 minutes would be re-dispatched while its first attempt still runs.
  # The code sets a deadline on every task it creates; these are the numbers it uses, one per queue, each
  # read from the same place as the timeout of the handler that queue calls:
  #   convert      -> the worker's request timeout (worker.tf: var.dispatch_deadline_seconds)
  #   expand       -> the expand function's timeout (expansion AND redrive/cancel tasks use this queue)
  #   dead_letter  -> the dead-letter function's timeout
  #   changes      -> the changes function's timeout
  # Every process gets all four (shared_env): whoever enqueues on a queue knows its deadline, and a handler
  # knows its own budget. tests/infra fails if an env value and its handler's timeout stop sharing a source.
  queue_handler_timeouts = {
    convert     = var.dispatch_deadline_seconds
    expand      = local.functions.expand.timeout
    dead_letter = local.functions.dead_letter.timeout
    changes     = local.functions.changes.timeout
  }
  dispatch_deadline_env = {
    DICOMFLOW_DISPATCH_DEADLINE_SECONDS             = tostring(local.queue_handler_timeouts.convert)
    DICOMFLOW_EXPAND_DISPATCH_DEADLINE_SECONDS      = tostring(local.queue_handler_timeouts.expand)
    DICOMFLOW_DEAD_LETTER_DISPATCH_DEADLINE_SECONDS = tostring(local.queue_handler_timeouts.dead_letter)
    DICOMFLOW_CHANGES_DISPATCH_DEADLINE_SECONDS     = tostring(local.queue_handler_timeouts.changes)
  }

  # Environment shared by the worker and every function. Settings validates it at start-up, so the
  # deadline/timeout pair must be the same everywhere.
  shared_env = merge(local.retry_env, local.dispatch_deadline_env, {
    DICOMFLOW_MODE                    = "cloud"
    DICOMFLOW_PROJECT                 = var.project_id
    DICOMFLOW_REGION                  = var.region
    DICOMFLOW_FIRESTORE_DATABASE      = google_firestore_database.this.name
    DICOMFLOW_QUEUE_CONVERT           = google_cloud_tasks_queue.convert.name
    DICOMFLOW_QUEUE_DEAD_LETTER       = google_cloud_tasks_queue.control["dead_letter"].name
    DICOMFLOW_QUEUE_EXPAND            = google_cloud_tasks_queue.control["expand"].name
    DICOMFLOW_QUEUE_CHANGES           = google_cloud_tasks_queue.control["changes"].name
    DICOMFLOW_EXPAND_URL              = local.function_urls.expand
    DICOMFLOW_DEAD_LETTER_URL         = local.function_urls.dead_letter
    DICOMFLOW_CHANGES_URL             = local.function_urls.changes
    DICOMFLOW_PUBLIC_URL              = local.function_urls.batches
    DICOMFLOW_WEBHOOK_URL             = local.function_urls.webhook
    DICOMFLOW_TASKS_SERVICE_ACCOUNT   = google_service_account.tasks.email
    DICOMFLOW_CONVERT_TIMEOUT_SECONDS = tostring(local.convert_timeout_seconds)
    DICOMFLOW_SETTLE_SECONDS          = tostring(var.settle_seconds)
    DICOMFLOW_RETENTION_DAYS          = tostring(var.retention_days)
    DICOMFLOW_LOG_FORMAT              = "json"
    DICOMFLOW_LOG_LEVEL               = var.log_level
  }, local.access_env)

  # Access (issue 11): every process gets the same policy, because the batch API enforces it, expansion
  # applies each owner's listing limits and the changes/renew functions re-check a watch owner's roots.
  # Unset optional limits are dropped: the code applies its defaults (DICOMFLOW_MAX_*) instead.
  access_env = {
    DICOMFLOW_ADMINS = join(",", var.admins)
    DICOMFLOW_ACCESS_GRANTS = jsonencode({
      for who, grant in var.access_grants : lower(who) => merge(
        { roots = grant.roots },
        { for name, value in {
          max_unfinished_batches = grant.max_unfinished_batches
          max_batch_files        = grant.max_batch_files
          max_batch_bytes        = grant.max_batch_bytes
        } : name => value if value != null },
      )
    })
    DICOMFLOW_ACCESS_GROUPS          = jsonencode(var.access_groups)
    DICOMFLOW_MAX_UNFINISHED_BATCHES = tostring(var.max_unfinished_batches)
    DICOMFLOW_MAX_BATCH_FILES        = tostring(var.max_batch_files)
    DICOMFLOW_MAX_BATCH_BYTES        = tostring(var.max_batch_bytes)
    # Tokens for the batch API: minted for its URL (GCP_FACTS §6; Cloud Run checks the same audience).
    DICOMFLOW_AUTH_AUDIENCES = join(",", concat([local.function_urls.batches], var.api_extra_audiences))
  }

  # Who dicomflow is on Drive: one identity for the worker and every function that touches Drive, so users
  # share their folders with a single account. Either the OAuth user (var.drive_user_oauth), or the
  # `drive` service account, which the others act as (impersonation; roles in iam.tf).
  drive_identity = var.drive_user_oauth ? var.drive_user_email : google_service_account.drive.email
  drive_credentials_env = merge(
    var.drive_user_oauth ? { DICOMFLOW_DRIVE_CREDENTIALS = local.drive_token_path } : {
      DICOMFLOW_DRIVE_SERVICE_ACCOUNT                    = google_service_account.drive.email
    },
    { DICOMFLOW_DRIVE_IDENTITY = local.drive_identity },
  )

  # gunicorn's request timeout (container/Dockerfile): 30 s past Cloud Run's request timeout (worker.tf,
  # = the convert dispatch deadline), so gunicorn never cuts a request Cloud Run still waits for, and
  # frees the instance soon after one Cloud Run gave up on (GCP_FACTS gotcha 25).
  gunicorn_timeout_seconds = var.dispatch_deadline_seconds + 30

  worker_env = merge(local.shared_env, local.drive_credentials_env, {
    DICOMFLOW_WORKER_URL       = local.worker_self_url
    DICOMFLOW_MEMORY_BUDGET_MB = tostring(var.worker_memory_mib)
    GUNICORN_CMD_ARGS          = "--timeout=${local.gunicorn_timeout_seconds}"
  })

  function_env = {
    for key, fn in local.functions : key => merge(
      local.shared_env,
      fn.drive ? local.drive_credentials_env : {},
      { DICOMFLOW_WORKER_URL = google_cloud_run_v2_service.worker.uri },
    )
  }
}
