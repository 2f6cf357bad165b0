"""Records ⇄ plain dicts, shared by the SQLite and Firestore stores so both hold the same documents.

Field names are spelled out (not abbreviated) where a person reads them in the Firestore console;
scan results, which nobody reads and which can number in the hundreds of thousands, are compact.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from dicomflow.domain.facts import SeriesFacts
from dicomflow.domain.failures import Failure
from dicomflow.domain.layout import Layout
from dicomflow.domain.locations import parse_location
from dicomflow.domain.model import Batch, BatchStatus, Counters, Item, ItemState, OutputFile, Timings
from dicomflow.domain.privacy import DirScrub
from dicomflow.domain.series import ConversionOptions, DicomHeader, FileRef, Ignored, IgnoredKind, ScanResult
from dicomflow.ports import ExpansionChunk, PendingFolder, SkippedFile, WatchChannel

BATCH_TIME_FIELDS = ("created_at", "updated_at", "finished_at", "expanded_at", "expires_at")
ITEM_TIME_FIELDS = ("created_at", "updated_at", "started_at", "finished_at", "lease_until", "expires_at")


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def batch_to_dict(batch: Batch) -> dict[str, Any]:
    return {
        "batch_id": batch.batch_id,
        "sources": [s.uri for s in batch.sources],
        "destination": batch.destination.uri,
        "options": batch.options.to_dict(),
        "label": batch.label,
        "status": batch.status.value,
        "force": batch.force,
        "created_at": batch.created_at,
        "updated_at": batch.updated_at,
        "finished_at": batch.finished_at,
        "expanded_at": batch.expanded_at,
        "files_seen": batch.files_seen,
        "files_ignored": batch.files_ignored,
        "ignored_examples": list(batch.ignored_examples),
        "failure": batch.failure.to_dict() if batch.failure else None,
        # A snapshot for people reading the stored document; the API always derives fresh counters.
        "counters": batch.counters.to_dict(),
        "epoch": batch.epoch,
        "listing": batch.listing,
        "listed_chunks": batch.listed_chunks,
        "restarts": batch.restarts,
        "redrives": batch.redrives,
        "expires_at": batch.expires_at,
        "owner": batch.owner,
        "layout": batch.layout.to_dict(),
        "completions": batch.completions,
        "finished": batch.finished,
        "finish_key": batch.finish_key,
        "finish_seq": batch.finish_seq,
        # Derived, for the reconciler's query of batches whose finish step has not run.
        "finish_pending": batch.finish_pending,
        "report_ref": batch.report_ref,
    }


def batch_from_dict(data: Mapping[str, Any], counters: Counters | None = None) -> Batch:
    snapshot = data.get("counters") or {}
    return Batch(
        batch_id=str(data["batch_id"]),
        sources=tuple(parse_location(s, field="sources") for s in data["sources"]),
        destination=parse_location(str(data["destination"]), field="destination"),
        options=ConversionOptions.from_dict(data.get("options") or {}),
        label=str(data.get("label", "")),
        status=BatchStatus(data["status"]),
        force=bool(data.get("force", False)),
        created_at=float(data["created_at"]),
        updated_at=float(data["updated_at"]),
        finished_at=_opt_float(data.get("finished_at")),
        expanded_at=_opt_float(data.get("expanded_at")),
        files_seen=int(data.get("files_seen", 0)),
        files_ignored=int(data.get("files_ignored", 0)),
        ignored_examples=tuple(data.get("ignored_examples") or ()),
        failure=Failure.from_dict(data["failure"]) if data.get("failure") else None,
        counters=counters if counters is not None else Counters(**{k: int(v) for k, v in snapshot.items()}),
        epoch=int(data.get("epoch", 0)),
        listing=str(data.get("listing", "")),
        listed_chunks=int(data.get("listed_chunks", 0)),
        restarts=int(data.get("restarts", 0)),
        redrives=int(data.get("redrives", 0)),
        expires_at=_opt_float(data.get("expires_at")),
        owner=str(data.get("owner") or ""),
        layout=Layout.from_dict(data.get("layout")),
        completions=int(data.get("completions") or 0),
        finished=int(data.get("finished") or 0),
        finish_key=str(data.get("finish_key") or ""),
        finish_seq=int(data.get("finish_seq") or 0),
        report_ref=str(data.get("report_ref") or ""),
    )


def item_to_dict(item: Item, *, with_files: bool = True) -> dict[str, Any]:
    data: dict[str, Any] = {
        "batch_id": item.batch_id,
        "item_id": item.item_id,
        "sop_class_uid": item.sop_class_uid,
        "fingerprint": item.fingerprint,
        "dest_key": item.dest_key,
        "rel_dir": item.rel_dir,
        "output_stem": item.output_stem,
        "series_number": item.series_number,
        "modality": item.modality,
        "description": item.description,
        "state": item.state.value,
        "created_at": item.created_at,
        "updated_at": item.updated_at,
        "bytes_total": item.bytes_total,
        "file_count": item.file_count,
        "attempts": item.attempts,
        "generation": item.generation,
        "task_seq": item.task_seq,
        "lease_owner": item.lease_owner,
        "lease_until": item.lease_until,
        "handed_off": item.handed_off,
        "rev": item.rev,
        "started_at": item.started_at,
        "finished_at": item.finished_at,
        "timings": item.timings.to_dict(),
        "outputs": [o.to_dict() for o in item.outputs],
        "warnings": list(item.warnings),
        "failure": item.failure.to_dict() if item.failure else None,
        "skip_reason": item.skip_reason,
        "incomplete": item.incomplete,
        "expires_at": item.expires_at,
        "publishing": [o.to_dict() for o in item.publishing],
        # Derived, for the reconciler's query (Firestore cannot filter on the length of a list).
        "needs_retraction": item.needs_retraction,
        "layout": item.layout,
        "subject": item.subject,
        "session": item.session,
        # One JSON text, not a map: sidecars are free-form (Firestore would index every key of them, and
        # refuses arrays inside arrays); thumbnails are opaque.
        "facts": json.dumps(item.facts.to_dict(), separators=(",", ":"), sort_keys=True),
        "placing": [o.to_dict() for o in item.placing],
    }
    if with_files:
        data["files"] = [f.to_dict() for f in item.files]
    return data


def item_from_dict(data: Mapping[str, Any], files: tuple[FileRef, ...] | None = None) -> Item:
    number = data.get("series_number")
    return Item(
        batch_id=str(data["batch_id"]),
        item_id=str(data["item_id"]),
        sop_class_uid=str(data["sop_class_uid"]),
        fingerprint=str(data["fingerprint"]),
        dest_key=str(data["dest_key"]),
        rel_dir=str(data.get("rel_dir", "")),
        output_stem=str(data.get("output_stem", "")),
        series_number=None if number is None else int(number),
        modality=str(data.get("modality", "")),
        description=str(data.get("description", "")),
        files=files if files is not None else tuple(FileRef.from_dict(f) for f in data.get("files") or ()),
        state=ItemState(data["state"]),
        created_at=float(data["created_at"]),
        updated_at=float(data["updated_at"]),
        bytes_total=int(data.get("bytes_total", 0)),
        file_count=int(data.get("file_count", 0)),
        attempts=int(data.get("attempts", 0)),
        generation=int(data.get("generation", 0)),
        task_seq=int(data.get("task_seq", 0)),
        lease_owner=str(data.get("lease_owner", "")),
        lease_until=_opt_float(data.get("lease_until")),
        handed_off=bool(data.get("handed_off", False)),
        rev=int(data.get("rev", 0)),
        started_at=_opt_float(data.get("started_at")),
        finished_at=_opt_float(data.get("finished_at")),
        timings=Timings.from_dict(data.get("timings") or {}),
        outputs=tuple(OutputFile.from_dict(o) for o in data.get("outputs") or ()),
        warnings=tuple(data.get("warnings") or ()),
        failure=Failure.from_dict(data["failure"]) if data.get("failure") else None,
        skip_reason=str(data.get("skip_reason", "")),
        incomplete=bool(data.get("incomplete", False)),
        expires_at=_opt_float(data.get("expires_at")),
        publishing=tuple(OutputFile.from_dict(o) for o in data.get("publishing") or ()),
        layout=str(data.get("layout") or "mirror"),
        subject=str(data.get("subject") or ""),
        session=str(data.get("session") or ""),
        facts=SeriesFacts.from_dict(json.loads(data["facts"]) if data.get("facts") else None),
        placing=tuple(OutputFile.from_dict(o) for o in data.get("placing") or ()),
    )


def scan_to_dict(result: ScanResult) -> dict[str, Any]:
    if isinstance(result, Ignored):
        return {"x": result.kind.value, "y": result.detail}
    return {
        "s": result.series_uid,
        "c": result.sop_class_uid,
        "i": result.sop_instance_uid,
        "n": result.series_number,
        "m": result.modality,
        "d": result.series_description,
        "t": list(result.image_type),
        "f": [f.to_dict() for f in result.folders],
    }


def scan_from_dict(data: Mapping[str, Any]) -> ScanResult:
    if "x" in data:
        return Ignored(IgnoredKind(data["x"]), str(data.get("y", "")))
    number = data.get("n")
    return DicomHeader(
        series_uid=str(data["s"]),
        sop_class_uid=str(data["c"]),
        sop_instance_uid=str(data["i"]),
        series_number=None if number is None else int(number),
        modality=str(data.get("m", "")),
        series_description=str(data.get("d", "")),
        image_type=tuple(data.get("t") or ()),
        folders=tuple(DirScrub.from_dict(f) for f in data.get("f") or ()),
    )


def chunk_to_dict(chunk: ExpansionChunk) -> dict[str, Any]:
    return {
        "batch_id": chunk.batch_id,
        "listing": chunk.listing,
        "chunk_no": chunk.chunk_no,
        "files": [f.to_dict() for f in chunk.files],
        "skipped": [{"path": s.path, "kind": s.ignored.kind.value, "detail": s.ignored.detail} for s in chunk.skipped],
        "scanned": chunk.results is not None,
        "results": None if chunk.results is None else [scan_to_dict(r) for r in chunk.results],
    }


def chunk_from_dict(data: Mapping[str, Any]) -> ExpansionChunk:
    results = data.get("results")
    return ExpansionChunk(
        batch_id=str(data["batch_id"]),
        chunk_no=int(data["chunk_no"]),
        files=tuple(FileRef.from_dict(f) for f in data.get("files") or ()),
        skipped=tuple(
            SkippedFile(str(s["path"]), Ignored(IgnoredKind(s["kind"]), str(s.get("detail", ""))))
            for s in data.get("skipped") or ()
        ),
        results=None if results is None else tuple(scan_from_dict(r) for r in results),
        listing=str(data.get("listing", "")),
    )


def channel_to_dict(channel: WatchChannel) -> dict[str, Any]:
    data = asdict(channel)
    data["options"] = dict(channel.options)
    return data


def channel_from_dict(data: Mapping[str, Any]) -> WatchChannel:
    return WatchChannel(
        channel_id=str(data["channel_id"]),
        resource_id=str(data["resource_id"]),
        folder_id=str(data["folder_id"]),
        destination=str(data["destination"]),
        page_token=str(data["page_token"]),
        expires_at=float(data["expires_at"]),
        created_at=float(data["created_at"]),
        options=dict(data.get("options") or {}),
        label=str(data.get("label", "")),
        active=bool(data.get("active", True)),
        owner=str(data.get("owner") or ""),
        token_hash=str(data.get("token_hash") or ""),
        last_message=int(data.get("last_message") or 0),
    )


def pending_to_dict(folder: PendingFolder) -> dict[str, Any]:
    return asdict(folder)


def pending_from_dict(data: Mapping[str, Any]) -> PendingFolder:
    return PendingFolder(
        folder_id=str(data["folder_id"]),
        watch_folder_id=str(data["watch_folder_id"]),
        first_change_at=float(data["first_change_at"]),
        last_change_at=float(data["last_change_at"]),
        submitted_batch_id=str(data.get("submitted_batch_id", "")),
    )
