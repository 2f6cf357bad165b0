# Firestore (native mode): batches/{batch_id}, batches/{id}/items/{item_id}, batches/{id}/chunks/{n},
# idempotency_keys/{hash}, channels/{channel_id}, pending_folders/{folder_id}.

resource "google_firestore_database" "this" {
  project     = var.project_id
  name        = var.firestore_database
  location_id = local.firestore_location
  type        = "FIRESTORE_NATIVE"

  # Counters move inside transactions together with item state (DESIGN.md invariant 2).
  concurrency_mode                  = "PESSIMISTIC"
  point_in_time_recovery_enablement = var.firestore_point_in_time_recovery ? "POINT_IN_TIME_RECOVERY_ENABLED" : "POINT_IN_TIME_RECOVERY_DISABLED"

  # Deletion protection on by default: the API refuses to delete the database, and terraform destroy
  # only forgets it (ABANDON).
  delete_protection_state = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy         = var.deletion_protection ? "ABANDON" : "DELETE"

  depends_on = [google_project_service.this]
}

# --- composite indexes ------------------------------------------------------------------------------------

# Already-converted series across batches (skip unless `force`): items with this destination and
# fingerprint that succeeded.
resource "google_firestore_index" "items_dest_state_fingerprint" {
  project     = var.project_id
  database    = google_firestore_database.this.name
  collection  = "items"
  query_scope = "COLLECTION_GROUP"

  fields {
    field_path = "dest_key"
    order      = "ASCENDING"
  }
  fields {
    field_path = "state"
    order      = "ASCENDING"
  }
  fields {
    field_path = "fingerprint"
    order      = "ASCENDING"
  }
}

# Reconciler: items `running` whose lease expired.
resource "google_firestore_index" "items_state_lease" {
  project     = var.project_id
  database    = google_firestore_database.this.name
  collection  = "items"
  query_scope = "COLLECTION_GROUP"

  fields {
    field_path = "state"
    order      = "ASCENDING"
  }
  fields {
    field_path = "lease_until"
    order      = "ASCENDING"
  }
}

# Reconciler: items `retrying` for much longer than the longest backoff (lost task).
resource "google_firestore_index" "items_state_updated" {
  project     = var.project_id
  database    = google_firestore_database.this.name
  collection  = "items"
  query_scope = "COLLECTION_GROUP"

  fields {
    field_path = "state"
    order      = "ASCENDING"
  }
  fields {
    field_path = "updated_at"
    order      = "ASCENDING"
  }
}

# Batch listings by status, newest first (CLI status, reconciler's stalled expansions).
resource "google_firestore_index" "batches_status_created" {
  project     = var.project_id
  database    = google_firestore_database.this.name
  collection  = "batches"
  query_scope = "COLLECTION"

  fields {
    field_path = "status"
    order      = "ASCENDING"
  }
  fields {
    field_path = "created_at"
    order      = "DESCENDING"
  }
}

# --- TTL policies -----------------------------------------------------------------------------------------
# Firestore deletes a document typically within 24 h after the timestamp in its TTL field; until then it
# still shows up in queries (GCP_FACTS §5), so the code checks expires_at itself.

resource "google_firestore_field" "idempotency_keys_ttl" {
  project    = var.project_id
  database   = google_firestore_database.this.name
  collection = "idempotency_keys"
  field      = "expires_at"

  ttl_config {}
}

# `chunks` is a subcollection of batches; a field config on a collection id applies to the collection
# group, i.e. to batches/*/chunks.
resource "google_firestore_field" "chunks_ttl" {
  project    = var.project_id
  database   = google_firestore_database.this.name
  collection = "chunks"
  field      = "expires_at"

  ttl_config {}
}
