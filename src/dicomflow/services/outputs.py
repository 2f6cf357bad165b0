"""Outputs of a series that ends without a success.

An attempt records what it is about to publish (Item.publishing) in the same write that last confirms its
lease. If the series then ends dead-lettered or skipped, its publish may have landed while the record of
the success was lost (a store error after the write, a crash between publishing and recording). Those
files are removed — only where they still hold exactly the bytes that attempt wrote, and never one a
succeeded series (this or another batch) records in the same destination — so that what a destination
holds is exactly what the succeeded series record (DESIGN.md invariant 1 at the level of files).

Every transition that can end a series goes through `finalize`; if the retraction fails, the reconciler
finds the series (find_unretracted) and tries again.
"""

from __future__ import annotations

from dicomflow.domain import model
from dicomflow.domain.model import Item
from dicomflow.ports import ItemChange
from dicomflow.services.context import Context


def finalize(ctx: Context, batch_id: str, item_id: str, change: ItemChange) -> tuple[Item, bool]:
    """Apply a transition that may end the series; then retract what an unrecorded publish left."""
    item, changed = ctx.update_item(batch_id, item_id, change)
    if item.needs_retraction:
        retract(ctx, item)
    return item, changed


def retract(ctx: Context, item: Item) -> int:
    batch = ctx.store.get_batch(item.batch_id, counted=False)
    keep = ctx.store.recorded_outputs(item.dest_key, item.item_id)
    doomed = [o for o in item.publishing if (o.name, o.sha256) not in keep]
    removed = 0
    if doomed:
        removed = ctx.sink_for(batch.destination).retract(batch.destination, doomed, owner_key=item.item_id)
    ctx.store.update_item(item.batch_id, item.item_id, lambda i: model.retracted(i, ctx.clock()))
    return removed
