# Firestore (native mode): batches/{batch_id}, batches/{id}/items/{item_id} (+ .../files/{n}),
# batches/{id}/chunks/{n}, idempotency_keys/{hash}, channels/{channel_id}, pending_folders/{folder_id},
# datasets/{destination key} (the writer's lease and the files report.html and BIDS datasets own).

resource "google_firestore_database" "this" {
  project     = var.project_id
  name        = var.firestore_database
  location_id = local.firestore_location
  type        = "FIRESTORE_NATIVE"

  # dicomflow uses no multi-document transactions: each state transition is one write conditioned on
  # the document's update time, and counters are count() aggregations (docs/architecture.md). Optimistic
  # mode keeps any reader from ever taking a lock.
  concurrency_mode                  = "OPTIMISTIC"
  point_in_time_recovery_enablement = var.firestore_point_in_time_recovery ? "POINT_IN_TIME_RECOVERY_ENABLED" : "POINT_IN_TIME_RECOVERY_DISABLED"

  # Deletion protection on by default: the API refuses to delete the database, and terraform destroy
  # only forgets it (ABANDON).
  delete_protection_state = var.deletion_protection ? "DELETE_PROTECTION_ENABLED" : "DELETE_PROTECTION_DISABLED"
  deletion_policy         = var.deletion_protection ? "ABANDON" : "DELETE"

  depends_on = [google_project_service.this]
}

# --- composite indexes ------------------------------------------------------------------------------------
# One per query the code runs that single-field indexes cannot serve (adapters/firestore_store.py).

locals {
  firestore_indexes = {
    # Already-converted series across batches (skipped unless `force`): items with this destination and
    # fingerprint that succeeded.
    items_dest_state_fingerprint = {
      collection = "items", scope = "COLLECTION_GROUP"
      fields     = [["dest_key", "ASCENDING"], ["state", "ASCENDING"], ["fingerprint", "ASCENDING"]]
    }
    # A series' earlier successes in a destination: its recorded outputs (never retracted) and its file
    # count (a re-run never converts fewer files over good outputs): (dest_key ==, state ==, item_id ==/in).
    items_dest_state_item = {
      collection = "items", scope = "COLLECTION_GROUP"
      fields     = [["dest_key", "ASCENDING"], ["state", "ASCENDING"], ["item_id", "ASCENDING"]]
    }
    # The finish step of a --layout bids batch plans the destination's dataset from every succeeded BIDS
    # series of it, of any batch (dest_key ==, state ==, layout ==, paged by document name).
    items_dest_state_layout = {
      collection = "items", scope = "COLLECTION_GROUP"
      fields     = [["dest_key", "ASCENDING"], ["state", "ASCENDING"], ["layout", "ASCENDING"]]
    }
    # Reconciler: items `running` whose lease expired (state ==, lease_until <).
    items_state_lease = {
      collection = "items", scope = "COLLECTION_GROUP"
      fields     = [["state", "ASCENDING"], ["lease_until", "ASCENDING"]]
    }
    # Reconciler: items `pending` or `retrying` untouched for longer than a task could take (a lost or
    # dropped task, GCP_FACTS gotcha 21): (state ==, updated_at <), one query per state, one index.
    items_state_updated = {
      collection = "items", scope = "COLLECTION_GROUP"
      fields     = [["state", "ASCENDING"], ["updated_at", "ASCENDING"]]
    }
    # The batch API shows each caller their own batches, newest first (owner ==, order by created_at)...
    batches_owner_created = {
      collection = "batches", scope = "COLLECTION"
      fields     = [["owner", "ASCENDING"], ["created_at", "DESCENDING"]]
    }
    # ...and counts their unfinished ones for the per-submitter limit (owner ==, status in, created_at).
    batches_owner_status_created = {
      collection = "batches", scope = "COLLECTION"
      fields     = [["owner", "ASCENDING"], ["status", "ASCENDING"], ["created_at", "DESCENDING"]]
    }
    # Batch listings by status, newest first (CLI status, reconciler's stalled expansions).
    batches_status_created = {
      collection = "batches", scope = "COLLECTION"
      fields     = [["status", "ASCENDING"], ["created_at", "DESCENDING"]]
    }
  }
}

resource "google_firestore_index" "this" {
  for_each = local.firestore_indexes

  project     = var.project_id
  database    = google_firestore_database.this.name
  collection  = each.value.collection
  query_scope = each.value.scope

  dynamic "fields" {
    for_each = each.value.fields
    content {
      field_path = fields.value[0]
      order      = fields.value[1]
    }
  }
}

# The reconciler's query for series whose unrecorded outputs still need removing (needs_retraction ==
# true) runs over the `items` collection group; single-field indexes are not kept for collection groups
# unless asked for.
resource "google_firestore_field" "items_needs_retraction" {
  project    = var.project_id
  database   = google_firestore_database.this.name
  collection = "items"
  field      = "needs_retraction"

  index_config {
    indexes {
      order       = "ASCENDING"
      query_scope = "COLLECTION_GROUP"
    }
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

# Finished batches and their series expire `var.retention_days` after they finish: the code writes
# `expires_at` on batches/{id} and batches/{id}/items/{id} (DICOMFLOW_RETENTION_DAYS, set in main.tf from
# the same variable). A document without the field never expires, so running batches are kept.
# Each collection group may have one TTL field only (https://cloud.google.com/firestore/docs/ttl); `items`
# and `batches` are their own groups, distinct from `chunks` and `idempotency_keys` above.
resource "google_firestore_field" "batches_ttl" {
  project    = var.project_id
  database   = google_firestore_database.this.name
  collection = "batches"
  field      = "expires_at"

  ttl_config {}
}

resource "google_firestore_field" "items_ttl" {
  project    = var.project_id
  database   = google_firestore_database.this.name
  collection = "items"
  field      = "expires_at"

  ttl_config {}
}

# File lists of very large series live under batches/{id}/items/{id}/files/{n}. TTL deletes a document,
# never its subcollections, so these need their own `expires_at` (written with the item's) or they would
# outlive their item.
resource "google_firestore_field" "item_files_ttl" {
  project    = var.project_id
  database   = google_firestore_database.this.name
  collection = "files"
  field      = "expires_at"

  ttl_config {}
}
