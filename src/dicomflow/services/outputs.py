"""Outputs of a series that ends without a success, and of earlier successes a new one replaces.

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

import logging

from dicomflow.domain import model
from dicomflow.domain.failures import DicomflowError, NotFound
from dicomflow.domain.layout import MIRROR
from dicomflow.domain.model import Item, ItemState, OutputFile
from dicomflow.events import Event
from dicomflow.ports import ItemChange
from dicomflow.services.context import Context, event


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


# How many of the most recent batches are searched for earlier successes of a series whose outputs a new
# success replaced (only when there is something to replace: a changed option or a changed series).
SUPERSEDE_SEARCH_BATCHES = 500


def replace_earlier_outputs(ctx: Context, item: Item) -> int:
    """After `item` succeeded: remove from its destination the outputs that earlier successes of the same
    series wrote there and this one did not (`--no-compress` then the default must not leave both .nii and
    .nii.gz; a re-exported series may give fewer volumes), so that a series' outputs are replaced as a set
    (issue 13). The sink removes only files dicomflow wrote for this series that still hold the recorded
    bytes. Those earlier successes then record no outputs and stop counting as "already converted"
    (model.supersede). Returns how many files were removed.

    Only the mirror layout's records: a BIDS dataset's series are replaced by its finish step, which keeps
    their names and runs (services/finish.py), and a series' BIDS files in the same destination are not
    the mirror's to remove.

    Best effort: the success stands whatever happens here; if removing fails, the files stay recorded by
    the earlier success and the next success of the series tries again."""
    if item.state is not ItemState.SUCCEEDED or item.finished_at is None or item.layout != MIRROR:
        return 0
    current = {o.name for o in item.outputs}
    recorded = ctx.store.recorded_outputs(item.dest_key, item.item_id, layout=MIRROR)
    stale = sorted((name, digest) for name, digest in recorded if name not in current)
    if not stale:
        return 0  # the usual case: one query, nothing to do
    batch = ctx.store.get_batch(item.batch_id, counted=False)
    try:
        removed = ctx.sink_for(batch.destination).retract(
            batch.destination, [OutputFile(name, 0, digest) for name, digest in stale], owner_key=item.item_id
        )
    except DicomflowError as exc:
        event(Event.OUTPUTS_REPLACED, f"earlier outputs of the series could not be removed: {exc.reason}",
              severity=logging.WARNING, batch_id=item.batch_id, item_id=item.item_id, code=exc.code)  # fmt: skip
        return 0
    finished = item.finished_at
    for earlier in _earlier_successes(ctx, item):
        ctx.store.update_item(
            earlier.batch_id,
            earlier.item_id,
            lambda i: model.supersede(i, ctx.clock(), by_batch=item.batch_id, finished_before=finished),
        )
    event(Event.OUTPUTS_REPLACED, "earlier outputs of the series replaced", batch_id=item.batch_id,
          item_id=item.item_id, removed=removed, stale=len(stale))  # fmt: skip
    return removed


def _earlier_successes(ctx: Context, item: Item) -> list[Item]:
    found: list[Item] = []
    for batch in ctx.store.list_batches(limit=SUPERSEDE_SEARCH_BATCHES, counted=False):
        if batch.batch_id == item.batch_id or batch.destination.key != item.dest_key:
            continue
        try:
            earlier = ctx.store.get_item(batch.batch_id, item.item_id)
        except NotFound:
            continue
        if earlier.state is ItemState.SUCCEEDED and earlier.outputs and earlier.layout == MIRROR:
            found.append(earlier)
    return found
