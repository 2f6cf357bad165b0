"""Every task dicomflow creates, and its name.

Names are deterministic, so a step that is retried creates the same task again and Cloud Tasks'
de-duplication turns the repeat into a no-op; and they are new wherever a task must run again after its
name was used (a task name stays blocked for up to a day after it ran or was dropped: GCP_FACTS gotcha
10): per expansion epoch, per redrive generation, per reconciler re-enqueue (`task_seq`), per attempt for
dead-letter hand-offs. Ids hold only [A-Za-z0-9_-] (no dots).
"""

from __future__ import annotations

from dicomflow.domain.model import Batch, Item, convert_task_id
from dicomflow.ports import QueueName, Task


def convert_task(item: Item) -> Task:
    """The item's current convert task (its generation and task sequence)."""
    return Task(
        QueueName.CONVERT,
        item.task_id,
        {"batch_id": item.batch_id, "item_id": item.item_id, "generation": item.generation},
    )


def convert_task_for(item: Item, generation: int) -> Task:
    """The first convert task of `generation` (a redrive creates it before moving the item there)."""
    return Task(
        QueueName.CONVERT,
        convert_task_id(item.batch_id, item.item_id, generation, 0),
        {"batch_id": item.batch_id, "item_id": item.item_id, "generation": generation},
    )


def expand_task(batch_id: str, epoch: int = 0) -> Task:
    return Task(
        QueueName.EXPAND, f"expand-{batch_id}-e{epoch}-list", {"batch_id": batch_id, "step": "list", "epoch": epoch}
    )


def scan_task(batch_id: str, epoch: int, chunk_no: int) -> Task:
    return Task(
        QueueName.EXPAND,
        f"expand-{batch_id}-e{epoch}-scan-{chunk_no}",
        {"batch_id": batch_id, "step": "scan", "epoch": epoch, "chunk_no": chunk_no},
    )


def group_task(batch_id: str, epoch: int) -> Task:
    return Task(
        QueueName.EXPAND, f"expand-{batch_id}-e{epoch}-group", {"batch_id": batch_id, "step": "group", "epoch": epoch}
    )


def redrive_task(batch_id: str, number: int) -> Task:
    return Task(QueueName.EXPAND, f"redrive-{batch_id}-{number}", {"batch_id": batch_id, "step": "redrive"})


def cancel_task(batch_id: str) -> Task:
    return Task(QueueName.EXPAND, f"cancel-{batch_id}", {"batch_id": batch_id, "step": "cancel"})


def finish_task(batch: Batch) -> Task:
    """The finish step of the batch's last completion (services/finish.py): new per completion, and per
    reconciler re-enqueue (`finish_seq`)."""
    return Task(
        QueueName.EXPAND,
        f"finish-{batch.batch_id}-c{batch.completions}-r{batch.finish_seq}",
        {"batch_id": batch.batch_id, "step": "finish", "completion": batch.completions},
    )
