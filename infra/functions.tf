# Cloud Functions (gen2): one function per entry point of functions/main.py, all built from the same
# source archive (storage.tf), each with its own service account (iam.tf) and invoker list.

resource "google_cloudfunctions2_function" "function" {
  for_each = local.functions

  project     = var.project_id
  name        = each.value.name
  location    = var.region
  description = each.value.description

  build_config {
    runtime         = "python311"
    entry_point     = each.value.entry_point
    service_account = google_service_account.build.id

    source {
      storage_source {
        bucket = google_storage_bucket.functions_source.name
        object = google_storage_bucket_object.functions_source.name
      }
    }
  }

  service_config {
    service_account_email = google_service_account.function[each.key].email
    # HTTP functions may run up to 3600 s (GCP_FACTS §6); expansion gets 1800 s like a convert task.
    timeout_seconds                  = each.value.timeout
    available_memory                 = each.value.memory
    available_cpu                    = "1"
    min_instance_count               = 0
    max_instance_count               = var.functions_max_instances
    max_instance_request_concurrency = 1
    all_traffic_on_latest_revision   = true
    # The batch API and the Drive webhook are called from the internet (IAM / channel token protect them).
    ingress_settings      = contains(["submitters", "public"], each.value.invoker) ? "ALLOW_ALL" : var.task_functions_ingress
    environment_variables = local.function_env[each.key]

    dynamic "secret_environment_variables" {
      for_each = merge(
        each.value.webhook_token ? { DICOMFLOW_WEBHOOK_TOKEN = google_secret_manager_secret.webhook_token.secret_id } : {},
        each.value.pseudonym_key ? { DICOMFLOW_PSEUDONYM_KEY = google_secret_manager_secret.pseudonym_key.secret_id } : {},
      )
      content {
        key        = secret_environment_variables.key
        project_id = var.project_id
        secret     = secret_environment_variables.value
        # "latest" is resolved when an instance starts: after adding a version, redeploy or wait for
        # new instances (docs/operations.md, rotating the webhook token).
        version = "latest"
      }
    }

    dynamic "secret_volumes" {
      for_each = var.drive_user_oauth && each.value.drive ? [local.drive_secret_mount] : []
      content {
        mount_path = secret_volumes.value
        project_id = var.project_id
        secret     = google_secret_manager_secret.drive_oauth_token[0].secret_id
        versions {
          path    = "token.json"
          version = "latest"
        }
      }
    }
  }

  depends_on = [
    google_project_service.this,
    google_project_iam_member.build,
    google_project_iam_member.datastore_user,
    google_secret_manager_secret_iam_member.webhook_token,
    google_secret_manager_secret_iam_member.pseudonym_key,
    google_secret_manager_secret_iam_member.drive_oauth_token,
  ]
}
