"""Names of the structured log events dicomflow emits.

Log-based metrics and alert policies in infra/observability.tf filter on `jsonPayload.event`; a test
checks that every event named there is one of these and is really logged by the code.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    BATCH_SUBMITTED = "batch_submitted"
    BATCH_EXPANDED = "batch_expanded"
    BATCH_FAILED = "batch_failed"
    BATCH_COMPLETED = "batch_completed"
    BATCH_CANCELLED = "batch_cancelled"
    BATCH_FINISHED = "batch_finished"  # its report (and, for --layout bids, its dataset) is written
    DATASET_FILE_KEPT = "dataset_file_kept"  # a top-level file someone edited is left as they made it
    SERIES_SUCCEEDED = "series_succeeded"
    SERIES_SKIPPED = "series_skipped"
    SERIES_ATTEMPT_FAILED = "series_attempt_failed"
    SERIES_HANDED_TO_DLQ = "series_handed_to_dead_letter"
    SERIES_DEAD_LETTERED = "series_dead_lettered"
    SERIES_REDRIVEN = "series_redriven"
    OUTPUTS_REPLACED = "outputs_replaced"
    DUPLICATE_DELIVERY = "duplicate_delivery"
    RECONCILE_REQUEUED = "reconcile_requeued"
    RECONCILE_DEAD_LETTERED = "reconcile_dead_lettered"
    TASK_REJECTED = "task_rejected"
    WEBHOOK_REJECTED = "webhook_rejected"
    WEBHOOK_ACCEPTED = "webhook_accepted"
    CHANGES_PROCESSED = "changes_processed"
    FOLDER_SETTLED = "folder_settled"
    CHANNEL_CREATED = "channel_created"
    CHANNEL_RENEWED = "channel_renewed"
    CHANNEL_RENEWAL_FAILED = "channel_renewal_failed"
    CHANNEL_STOPPED = "channel_stopped"
