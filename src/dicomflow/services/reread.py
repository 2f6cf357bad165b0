"""Reading dead-lettered series again from their source before they are converted again (a redrive:
`dicomflow dlq retry`, the API's :retry-dead-letters).

The usual fixes happen in the source: a re-exported file replaces a corrupt one (same name or not), a
missing slice is put back, a stray file is removed, a permission is fixed. Re-reading only the files known
at expansion would miss every one of those but the first (issue 13). So the folders that held each series
are listed again and the headers of every file in them are read, exactly as expansion does, and a series
gets the files whose (SeriesInstanceUID, SOPClassUID) are its own: new ones included, removed ones gone,
each SOPInstanceUID once. Works for every Source (local folders, Drive); file names never leave the
adapters (the series are matched by their headers).
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from dicomflow.domain.model import Batch, Item, positioned
from dicomflow.domain.paths import join
from dicomflow.domain.series import DicomHeader, FileRef, fingerprint, group_series
from dicomflow.ports import SkippedFile
from dicomflow.services import expand
from dicomflow.services.context import Context


@dataclass(frozen=True, slots=True)
class SeriesNow:
    """A series as its source holds it now."""

    files: tuple[FileRef, ...]
    fingerprint: str


def reread_series(ctx: Context, batch: Batch, items: Sequence[Item]) -> dict[str, SeriesNow]:
    """The current files of each of `items` (by item id), read from the batch's sources. A series none of
    whose files can be found any more (deleted, moved elsewhere, no longer readable) is absent from the
    answer. Errors of the source propagate: transient ones so the caller's task is retried, permanent ones
    (the source folder is gone or no longer shared) for the caller to record.

    Items keep their files by reference (a local path, a Drive id) and position only (docs/privacy.md), so
    the folders that held a series are found in the listing by the references it had: a folder in which
    every file was replaced under a new Drive id is not found (the series reads as gone, and the reason
    says to convert the folder that holds it now)."""
    if not items:
        return {}
    known = {f.ref for item in items for f in item.files}
    wanted = {i.item_id for i in items}
    listed: list[FileRef] = []
    # Paths carry a per-source prefix when a batch has several sources: the same one expansion gave them.
    for source, prefix in zip(batch.sources, expand.source_prefixes(ctx, batch), strict=True):
        for entry in ctx.source_for(source).list_files(source):
            if not isinstance(entry, SkippedFile):
                listed.append(FileRef(entry.ref, join(prefix, entry.path), entry.size, entry.md5))
    folders = {posixpath.dirname(ref.path) for ref in listed if ref.ref in known}
    candidates = sorted((ref for ref in listed if posixpath.dirname(ref.path) in folders), key=lambda r: r.path)
    location = batch.sources[0]  # all sources of a batch are of one kind (checked at submission)
    results = ctx.scanner_for(location).scan(ctx.source_for(location), candidates)
    ours = [
        (ref, header)
        for ref, header in zip(candidates, results, strict=True)
        if isinstance(header, DicomHeader) and header.key.item_id in wanted
    ]
    version = ctx.conversion_version
    return {
        group.key.item_id: SeriesNow(
            positioned(group.files), fingerprint(group.key, group.sop_instance_uids, version, batch.options)
        )
        for group in group_series(ours)
    }
