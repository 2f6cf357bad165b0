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

from dicomflow.domain.model import Batch, Item
from dicomflow.domain.paths import join
from dicomflow.domain.series import DicomHeader, FileRef, SeriesKey, fingerprint, group_series
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
    (the source folder is gone or no longer shared) for the caller to record."""
    if not items:
        return {}
    folders = {posixpath.dirname(f.path) for item in items for f in item.files}
    wanted = {SeriesKey(i.series_uid, i.sop_class_uid): i.item_id for i in items}
    candidates: list[FileRef] = []
    # Paths carry a per-source prefix when a batch has several sources: the same one expansion gave them.
    for source, prefix in zip(batch.sources, expand._source_prefixes(ctx, batch), strict=True):
        for entry in ctx.source_for(source).list_files(source):
            if isinstance(entry, SkippedFile):
                continue
            path = join(prefix, entry.path)
            if posixpath.dirname(path) in folders:
                candidates.append(FileRef(entry.ref, path, entry.size, entry.md5))
    candidates.sort(key=lambda ref: ref.path)
    location = batch.sources[0]  # all sources of a batch are of one kind (checked at submission)
    results = ctx.scanner_for(location).scan(ctx.source_for(location), candidates)
    ours = [
        (ref, header)
        for ref, header in zip(candidates, results, strict=True)
        if isinstance(header, DicomHeader) and header.key in wanted
    ]
    version = ctx.converter.version
    return {
        wanted[group.key]: SeriesNow(
            group.files, fingerprint(group.key, group.sop_instance_uids, version, batch.options)
        )
        for group in group_series(ours)
    }
