# Identities and least-privilege grants. Additive *_iam_member only (never _iam_policy/_iam_binding),
# so nothing here can remove a grant somebody else made.
#
#   worker        converts series; Firestore; enqueues to the dead-letter queue; Drive
#   fn-<name>     one per function (main.tf local.functions says what each needs)
#   tasks         the identity whose OIDC token Cloud Tasks sends: run.invoker on the worker and on the
#                 task-handler functions, nothing else
#   scheduler     the identity whose OIDC token Cloud Scheduler sends: run.invoker on reconcile and renew
#   build         builds the function images (Cloud Build)

resource "google_service_account" "worker" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-worker"
  display_name = "dicomflow worker (Cloud Run)"
  description  = "Runs the dicomflow conversion worker; the identity it uses on Drive unless a user OAuth token is configured."

  depends_on = [google_project_service.this]
}

resource "google_service_account" "function" {
  for_each = local.functions

  project      = var.project_id
  account_id   = "${var.name_prefix}-fn-${replace(each.key, "_", "-")}"
  display_name = "dicomflow function ${each.value.name}"
  description  = "Runtime identity of the ${each.value.entry_point} function."

  depends_on = [google_project_service.this]
}

resource "google_service_account" "tasks" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-tasks"
  display_name = "dicomflow Cloud Tasks invoker"
  description  = "OIDC identity of dicomflow's Cloud Tasks: may invoke the worker and the task-handler functions only."

  depends_on = [google_project_service.this]
}

resource "google_service_account" "scheduler" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-scheduler"
  display_name = "dicomflow Cloud Scheduler invoker"
  description  = "OIDC identity of dicomflow's scheduler jobs: may invoke the reconcile and renew functions only."

  depends_on = [google_project_service.this]
}

resource "google_service_account" "build" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-build"
  display_name = "dicomflow function builds"
  description  = "Cloud Build identity for the dicomflow functions, so builds do not depend on the default compute service account."

  depends_on = [google_project_service.this]
}

# The Drive identity: the account users share folders with. It holds no project roles at all; the worker
# and the Drive-using functions act as it (roles/iam.serviceAccountTokenCreator on it, below).
resource "google_service_account" "drive" {
  project      = var.project_id
  account_id   = "${var.name_prefix}-drive"
  display_name = "dicomflow on Google Drive"
  description  = "The identity dicomflow uses on Google Drive; share DICOM folders and NIfTI destinations with it."

  depends_on = [google_project_service.this]
}

resource "google_service_account_iam_member" "drive_token_creator" {
  for_each = var.drive_user_oauth ? {} : merge(
    { worker = local.runtime_members.worker },
    { for key, fn in local.functions : key => local.runtime_members[key] if fn.drive },
  )

  service_account_id = google_service_account.drive.name
  role               = "roles/iam.serviceAccountTokenCreator"
  member             = each.value
}

locals {
  runtime_members = merge(
    { worker = "serviceAccount:${google_service_account.worker.email}" },
    { for key, sa in google_service_account.function : key => "serviceAccount:${sa.email}" },
  )

  firestore_users = merge(
    { worker = local.runtime_members.worker },
    { for key, fn in local.functions : key => local.runtime_members[key] if fn.firestore },
  )

  # Who creates tasks on which queue. The worker only hands series to the dead-letter queue; Cloud Tasks
  # itself does the retries.
  enqueue_grants = merge(
    { "worker/dead_letter" = { member = local.runtime_members.worker, queue = "dead_letter" } },
    merge([
      for key, fn in local.functions : {
        for queue in fn.enqueue : "${key}/${queue}" => { member = local.runtime_members[key], queue = queue }
      }
    ]...),
  )

  enqueuers = merge(
    { worker = local.runtime_members.worker },
    { for key, fn in local.functions : key => local.runtime_members[key] if length(fn.enqueue) > 0 },
  )

  queue_resource_names = merge(
    { convert = google_cloud_tasks_queue.convert.name },
    { for key, q in google_cloud_tasks_queue.control : key => q.name },
  )

  webhook_token_readers = { for key, fn in local.functions : key => local.runtime_members[key] if fn.webhook_token }
  pseudonym_key_readers = { for key, fn in local.functions : key => local.runtime_members[key] if fn.pseudonym_key }

  drive_token_readers = var.drive_user_oauth ? merge(
    { worker = local.runtime_members.worker },
    { for key, fn in local.functions : key => local.runtime_members[key] if fn.drive },
  ) : {}

  # Who may call each function (roles/run.invoker on its underlying Cloud Run service).
  function_invokers = merge(
    { for m in var.submitters : "batches/${m}" => { function = "batches", member = m } },
    { for key, fn in local.functions : "${key}/tasks" => { function = key, member = "serviceAccount:${google_service_account.tasks.email}" } if fn.invoker == "tasks" },
    { for key, fn in local.functions : "${key}/scheduler" => { function = key, member = "serviceAccount:${google_service_account.scheduler.email}" } if fn.invoker == "scheduler" },
    { for key, fn in local.functions : "${key}/public" => { function = key, member = "allUsers" } if fn.invoker == "public" },
  )
}

# --- logging ----------------------------------------------------------------------------------------------

resource "google_project_iam_member" "log_writer" {
  for_each = merge(local.runtime_members, { build = "serviceAccount:${google_service_account.build.email}" })

  project = var.project_id
  role    = "roles/logging.logWriter"
  member  = each.value
}

# --- Firestore --------------------------------------------------------------------------------------------

resource "google_project_iam_member" "datastore_user" {
  for_each = local.firestore_users

  project = var.project_id
  role    = "roles/datastore.user"
  member  = each.value

  # Only dicomflow's database (Firestore supports IAM conditions on the database resource name).
  condition {
    title       = "dicomflow-database-only"
    description = "Limits the grant to the dicomflow Firestore database."
    expression  = "resource.name == \"projects/${var.project_id}/databases/${google_firestore_database.this.name}\""
  }
}

# --- Cloud Tasks ------------------------------------------------------------------------------------------

resource "google_cloud_tasks_queue_iam_member" "enqueuer" {
  for_each = local.enqueue_grants

  project  = var.project_id
  location = var.region
  name     = local.queue_resource_names[each.value.queue]
  role     = "roles/cloudtasks.enqueuer"
  member   = each.value.member
}

# Creating a task with an OIDC token for the tasks service account requires iam.serviceAccounts.actAs on
# it (GCP_FACTS §4), granted on that one account only.
resource "google_service_account_iam_member" "tasks_act_as" {
  for_each = local.enqueuers

  service_account_id = google_service_account.tasks.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}

# --- invokers ---------------------------------------------------------------------------------------------

resource "google_cloud_run_v2_service_iam_member" "worker_invoker" {
  project  = var.project_id
  location = var.region
  name     = google_cloud_run_v2_service.worker.name
  role     = "roles/run.invoker"
  member   = "serviceAccount:${google_service_account.tasks.email}"
}

# A gen2 function is served by a Cloud Run service of the same name; calling it needs run.invoker there.
resource "google_cloud_run_v2_service_iam_member" "function_invoker" {
  for_each = local.function_invokers

  project  = var.project_id
  location = var.region
  name     = google_cloudfunctions2_function.function[each.value.function].name
  role     = "roles/run.invoker"
  member   = each.value.member
}

# --- secrets ----------------------------------------------------------------------------------------------

resource "google_secret_manager_secret_iam_member" "webhook_token" {
  for_each = local.webhook_token_readers

  project   = var.project_id
  secret_id = google_secret_manager_secret.webhook_token.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value
}

resource "google_secret_manager_secret_iam_member" "pseudonym_key" {
  for_each = local.pseudonym_key_readers

  project   = var.project_id
  secret_id = google_secret_manager_secret.pseudonym_key.secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value
}

resource "google_secret_manager_secret_iam_member" "drive_oauth_token" {
  for_each = local.drive_token_readers

  project   = var.project_id
  secret_id = google_secret_manager_secret.drive_oauth_token[0].secret_id
  role      = "roles/secretmanager.secretAccessor"
  member    = each.value
}

# --- function builds --------------------------------------------------------------------------------------

# Cloud Run Builder: exactly what a build of a Cloud Run function needs (read the staged source, push the
# image to Artifact Registry, write build logs), and no service-account impersonation.
# https://cloud.google.com/run/docs/reference/iam/roles (roles/run.builder),
# https://cloud.google.com/run/docs/configuring/services/build-service-account
resource "google_project_iam_member" "build" {
  project = var.project_id
  role    = "roles/run.builder"
  member  = "serviceAccount:${google_service_account.build.email}"
}
