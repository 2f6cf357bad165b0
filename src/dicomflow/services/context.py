"""What every use case receives: the ports, the settings and a clock. Built only by bootstrap.py."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from dicomflow.auth import Authenticator, LocalAuthenticator
from dicomflow.config import Settings
from dicomflow.domain.failures import InvalidInput
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import Item, ItemState
from dicomflow.events import Event
from dicomflow.ports import (
    Attempt,
    ChangeFeed,
    Converter,
    Deidentifier,
    HeaderScanner,
    Heartbeat,
    ImageInspector,
    ItemChange,
    Sink,
    Source,
    StateStore,
    TaskQueue,
)

log = logging.getLogger("dicomflow")

StepProgress = Callable[[str, str, str, int, int], None]
"""progress(batch_id, item_id, phase, done, total): phases are download, convert, upload."""


def _no_progress(_batch: str, _item: str, _phase: str, _done: int, _total: int) -> None:
    return None


@dataclass
class Context:
    settings: Settings
    store: StateStore
    queue: TaskQueue
    converter: Converter
    sources: dict[LocationKind, Callable[[], Source]]
    sinks: dict[LocationKind, Callable[[], Sink]]
    scanners: dict[LocationKind, Callable[[], HeaderScanner]]
    work_dir: Path
    heartbeat: Heartbeat
    deidentifier: Deidentifier
    inspector: ImageInspector
    change_feed: Callable[[], ChangeFeed] | None = None
    clock: Callable[[], float] = time.time
    # Random ids (batch ids, lease owners): injected so a simulation replays exactly from its seed.
    new_id: Callable[[int], str] = secrets.token_hex
    progress: StepProgress = _no_progress
    # How many expansion chunks can be scanned at once (local: worker processes; cloud: task fan-out).
    scan_parallelism: int = 1
    closers: list[Callable[[], None]] = field(default_factory=list)
    # Who calls the batch API and the task handlers (dicomflow.auth): token verification in the cloud.
    authenticator: Authenticator = field(default_factory=LocalAuthenticator)
    # Resolves a local path through symlinks (the dev stack's roots must not be escaped by a link).
    resolve_path: Callable[[str], str] = os.path.realpath
    _cache: dict[Any, Any] = field(default_factory=dict)

    def cache(self, name: str) -> dict[Any, Any]:
        """A per-process cache a service keeps on its Context (e.g. Drive parents for access checks)."""
        table: dict[Any, Any] = self._cache.setdefault(("cache", name), {})
        return table

    def close(self) -> None:
        """Release connections (Drive clients, database handles) this Context opened."""
        for closer in self.closers:
            closer()
        for resource in (self.store, self.queue):
            close = getattr(resource, "close", None)
            if callable(close):
                close()

    def attempt_owner(self) -> str:
        """A name for this attempt, unique across processes and hosts: the owner it records on a lease."""
        return f"{socket.gethostname()}:{os.getpid()}:{self.new_id(4)}"

    def answer_by(self, attempt: Attempt, dispatch_deadline_seconds: float) -> float | None:
        """When an attempt must stop working to record its outcome and answer before its dispatch deadline
        (None: no deadline). The margin shrinks to a quarter of a short deadline (a dev stack, a test)
        rather than eating all of it."""
        if attempt.deadline_at is None:
            return None
        margin = min(float(self.settings.answer_margin_seconds), dispatch_deadline_seconds / 4)
        return attempt.deadline_at - margin

    @property
    def conversion_version(self) -> str:
        """What enters every fingerprint besides the files and options: the converter and the profile."""
        return f"{self.converter.version}+{self.deidentifier.version}"

    def update_item(self, batch_id: str, item_id: str, change: ItemChange) -> tuple[Item, bool]:
        """store.update_item, plus retention: a series that reaches a final state is stamped with the time
        after which Firestore's TTL policy deletes it (DICOMFLOW_RETENTION_DAYS after it finished)."""
        retention = self.settings.retention_days * 86400.0

        def retained(item: Item) -> Item | None:
            updated = change(item)
            if updated is None or not updated.is_terminal or updated.finished_at is None:
                return updated
            if (
                updated.layout == "bids"
                and updated.state is ItemState.SUCCEEDED
                and (updated.outputs or updated.placing)
            ):
                # The record of a series in a BIDS dataset is the dataset's memory of it (its names, its run,
                # its sidecar): kept as long as the series is in the dataset (docs/privacy.md, retention).
                return replace(updated, expires_at=None)
            return replace(updated, expires_at=updated.finished_at + retention)

        return self.store.update_item(batch_id, item_id, retained)

    def source_for(self, location: Location) -> Source:
        source: Source = self._adapter(self.sources, location, "source")
        return source

    def sink_for(self, location: Location) -> Sink:
        sink: Sink = self._adapter(self.sinks, location, "destination")
        return sink

    def scanner_for(self, location: Location) -> HeaderScanner:
        """Built on first use: only expansion reads headers, and only it needs the pseudonym key."""
        scanner: HeaderScanner = self._adapter(self.scanners, location, "scanner")
        return scanner

    def changes(self) -> ChangeFeed:
        """Drive's changes feed (push notifications); built on first use."""
        if self.change_feed is None:
            raise InvalidInput("Drive push notifications are not configured here", field="drive")
        if "changes" not in self._cache:
            self._cache["changes"] = self.change_feed()
        feed: ChangeFeed = self._cache["changes"]
        return feed

    def _adapter(self, table: dict[LocationKind, Callable[[], Any]], location: Location, role: str) -> Any:
        key = (role, location.kind)
        if key not in self._cache:
            factory = table.get(location.kind)
            if factory is None:
                raise InvalidInput(f"{location.kind.value} locations cannot be used as a {role} here", field=role)
            self._cache[key] = factory()
        return self._cache[key]


def event(
    name: Event,
    message: str,
    *,
    severity: int = logging.INFO,
    batch_id: str = "",
    item_id: str = "",
    data: Mapping[str, Any] | None = None,
    **fields: Any,
) -> None:
    """One structured log event. `name` is what log-based metrics count (infra/observability.tf);
    `data` and `fields` land in jsonPayload. Never pass patient identifiers or source paths."""
    labels = {k: v for k, v in (("batch_id", batch_id), ("item_id", item_id)) if v}
    log.log(severity, message, extra={"event": name.value, "labels": labels, "fields": {**(data or {}), **fields}})
