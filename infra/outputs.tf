output "batches_api_url" {
  description = "Base URL of the batch API (POST /batches, GET /batches/{id}); callers need roles/run.invoker (var.submitters) and an identity token."
  value       = google_cloudfunctions2_function.function["batches"].url
}

output "function_urls" {
  description = "URL of every function, by key (batches, expand, dead_letter, changes, reconcile, renew, webhook)."
  value       = { for key, fn in google_cloudfunctions2_function.function : key => fn.url }
}

output "webhook_url" {
  description = "HTTPS address Drive sends push notifications to (DICOMFLOW_WEBHOOK_URL)."
  value       = local.function_urls.webhook
}

output "worker_url" {
  description = "URL of the Cloud Run worker (target of convert tasks)."
  value       = google_cloud_run_v2_service.worker.uri
}

output "service_accounts" {
  description = "E-mail of every service account, by role: worker, tasks, scheduler, build and fn-<function key>."
  value = merge(
    {
      worker    = google_service_account.worker.email
      tasks     = google_service_account.tasks.email
      scheduler = google_service_account.scheduler.email
      build     = google_service_account.build.email
    },
    { for key, sa in google_service_account.function : "fn-${key}" => sa.email },
  )
}

output "drive_share_with" {
  description = "The one identity dicomflow uses on Drive: share source folders with it (Viewer) and destination folders or shared drives (Editor / Content manager)."
  value       = local.drive_identity
}

output "queue_names" {
  description = "Cloud Tasks queue ids, by role (convert, dead_letter, expand, changes)."
  value = merge(
    { convert = google_cloud_tasks_queue.convert.name },
    { for key, q in google_cloud_tasks_queue.control : key => q.name },
  )
}

output "firestore_database" {
  description = "Firestore database id (DICOMFLOW_FIRESTORE_DATABASE)."
  value       = google_firestore_database.this.name
}

output "image_repository" {
  description = "Artifact Registry path to push the worker image to: <this>/worker:<tag>."
  value       = "${var.region}-docker.pkg.dev/${var.project_id}/${google_artifact_registry_repository.images.repository_id}"
}

output "functions_source_bucket" {
  description = "Bucket holding the functions source archives."
  value       = google_storage_bucket.functions_source.name
}

output "webhook_token_secret" {
  description = "Secret Manager secret id of the Drive channel token; add its value with `gcloud secrets versions add`."
  value       = google_secret_manager_secret.webhook_token.secret_id
}

output "drive_oauth_token_secret" {
  description = "Secret Manager secret id of the Drive user OAuth token (null unless drive_user_oauth)."
  value       = var.drive_user_oauth ? google_secret_manager_secret.drive_oauth_token[0].secret_id : null
}

output "dashboard_id" {
  description = "Resource name of the Cloud Monitoring dashboard (Monitoring > Dashboards > \"dicomflow (<name_prefix>)\")."
  value       = google_monitoring_dashboard.main.id
}

output "pseudonym_key_secret" {
  description = "Secret Manager secret of the pseudonym key: add one version of 32+ random bytes in hex before the first batch (docs/operations.md)."
  value       = google_secret_manager_secret.pseudonym_key.secret_id
}
