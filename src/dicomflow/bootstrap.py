"""The composition root: the only place where adapters are chosen and wired.

`build(settings, **overrides)` returns the Context every use case takes. Nothing is built at import
time; cloud client libraries are imported only when the cloud mode or a Drive location needs them (they
cost seconds of start-up that local runs should not pay). Tests pass overrides (a fake converter, a
clock) instead of patching.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomflow import auth, logs
from dicomflow.adapters.dcm2niix import Dcm2niixConverter
from dicomflow.adapters.deidentify import ProfileDeidentifier
from dicomflow.adapters.dicom_headers import SequentialScanner, ThreadedScanner
from dicomflow.adapters.heartbeat import ThreadHeartbeat
from dicomflow.adapters.local.files import LocalFolderSink, LocalFolderSource
from dicomflow.adapters.local.grouped import GroupingConverter
from dicomflow.adapters.local.private import private_dir
from dicomflow.adapters.local.queue import Delivery, SqliteTaskQueue, TaskRunner
from dicomflow.adapters.local.sqlite_store import SqliteStateStore
from dicomflow.auth import Authenticator
from dicomflow.config import Mode, Settings
from dicomflow.domain.facts import OutputImage
from dicomflow.domain.failures import ConfigError
from dicomflow.domain.locations import LocationKind
from dicomflow.domain.privacy import parse_extra_keys
from dicomflow.ports import (
    ChangeFeed,
    Converter,
    Deidentifier,
    HeaderScanner,
    Heartbeat,
    ImageInspector,
    Sink,
    Source,
    StateStore,
    TaskQueue,
)
from dicomflow.services.context import Context, StepProgress
from dicomflow.services.tasks import handle_task

# Expansion chunks scanned at once in the cloud: each is a task on the expand queue.
CLOUD_SCAN_PARALLELISM = 32
DRIVE_SCAN_THREADS = 16


def build(
    settings: Settings,
    *,
    store: StateStore | None = None,
    queue: TaskQueue | None = None,
    converter: Converter | None = None,
    sources: dict[LocationKind, Callable[[], Source]] | None = None,
    sinks: dict[LocationKind, Callable[[], Sink]] | None = None,
    scanners: dict[LocationKind, Callable[[], HeaderScanner]] | None = None,
    clock: Callable[[], float] | None = None,
    progress: StepProgress | None = None,
    work_dir: Path | None = None,
    change_feed: Callable[[], ChangeFeed] | None = None,
    heartbeat: Heartbeat | None = None,
    new_id: Callable[[int], str] | None = None,
    deidentifier: Deidentifier | None = None,
    authenticator: Authenticator | None = None,
    inspector: ImageInspector | None = None,
) -> Context:
    clock = clock or time.time
    if settings.mode is Mode.LOCAL:
        if not settings.state_path and (store is None or queue is None):
            raise ConfigError("local mode needs a state file: set DICOMFLOW_STATE_PATH or pass --state")
        path = Path(settings.state_path).expanduser()
        store = store or SqliteStateStore(path, clock)
        queue = queue or SqliteTaskQueue(path, clock)
        parallelism = settings.worker_count
    else:
        store = store or _firestore_store(settings, clock)
        queue = queue or _cloud_tasks_queue(settings)
        parallelism = CLOUD_SCAN_PARALLELISM
    drive, close_drive = _lazy_drive(settings)
    ctx = Context(
        settings=settings,
        store=store,
        queue=queue,
        converter=converter or Dcm2niixConverter(settings.convert_timeout_seconds),
        sources=sources or {LocationKind.LOCAL: LocalFolderSource, LocationKind.DRIVE: lambda: drive().source()},
        sinks=sinks or {LocationKind.LOCAL: LocalFolderSink, LocationKind.DRIVE: lambda: drive().sink()},
        scanners=scanners or _scanners(settings),
        work_dir=work_dir or _work_dir(settings),
        heartbeat=heartbeat or ThreadHeartbeat(),
        deidentifier=deidentifier or _deidentifier(settings),
        inspector=inspector or _LazyInspector(),
        clock=clock,
        scan_parallelism=parallelism,
        change_feed=change_feed or (lambda: drive().change_feed()),
        closers=[close_drive],
        authenticator=authenticator or auth.authenticator(settings),
    )
    if progress is not None:
        ctx.progress = progress
    if new_id is not None:
        ctx.new_id = new_id
    return ctx


class _LazyInspector:
    """nibabel and numpy are imported by the first worker that describes an image, not by every process
    that builds a Context (`dicomflow status`, the API function)."""

    def describe(self, path: Path) -> OutputImage | None:
        from dicomflow.adapters.thumbnails import NiftiInspector

        return NiftiInspector().describe(path)


def _scanners(settings: Settings) -> dict[LocationKind, Callable[[], HeaderScanner]]:
    return {
        LocationKind.LOCAL: lambda: SequentialScanner(pseudonym_key(settings)),
        LocationKind.DRIVE: lambda: ThreadedScanner(DRIVE_SCAN_THREADS, pseudonym_key(settings)),
    }


def _deidentifier(settings: Settings) -> Deidentifier:
    try:
        extra = parse_extra_keys(settings.sidecar_extra_keys)
    except ValueError as exc:
        raise ConfigError(f"DICOMFLOW_SIDECAR_EXTRA_KEYS: {exc}") from None
    # Local workers already use every core: the fast compression level; the cloud worker has time to spare.
    return ProfileDeidentifier(extra, gzip_level=4 if settings.mode is Mode.LOCAL else 6)


def pseudonym_key(settings: Settings) -> bytes:
    """The secret de-identified folder names are derived from (docs/privacy.md). Locally one per
    destination, created on first use next to the state (0600; never published: .dicomflow is not an
    output). In the cloud it must be configured (Terraform passes it from Secret Manager)."""
    if settings.pseudonym_key:
        return bytes.fromhex(settings.pseudonym_key)
    if settings.mode is not Mode.LOCAL or not settings.state_path:
        raise ConfigError(
            "cloud mode needs DICOMFLOW_PSEUDONYM_KEY (64+ hex characters; infra/ keeps it in Secret Manager)"
        )
    path = Path(settings.state_path).expanduser().parent / "pseudonym.key"
    if path.exists():
        return bytes.fromhex(path.read_text(encoding="ascii").strip())
    # Written whole under a temporary name, then linked into place: two processes starting at once agree
    # on one key, and nobody ever reads a half-written one.
    try:
        private_dir(path.parent)
        with tempfile.NamedTemporaryFile("w", encoding="ascii", dir=path.parent, delete=False) as handle:
            handle.write(secrets.token_hex(32) + "\n")  # NamedTemporaryFile creates it 0600
        try:
            os.link(handle.name, path)
        except FileExistsError:
            pass  # another process created it first: theirs is the key
        finally:
            Path(handle.name).unlink()
    except OSError as exc:
        raise ConfigError(f"cannot create {path} ({exc.strerror}); choose a destination you can write to") from None
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def _work_dir(settings: Settings) -> Path:
    """Scratch space for downloads and dcm2niix output. Locally it sits next to the state file, which is
    normally inside the destination: outputs then reach their place by a rename, not a copy."""
    if settings.work_dir:
        return Path(settings.work_dir).expanduser()
    if settings.mode is Mode.LOCAL and settings.state_path:
        return Path(settings.state_path).expanduser().parent / "work"
    return Path(tempfile.gettempdir()) / "dicomflow-work"


def _firestore_store(settings: Settings, clock: Callable[[], float]) -> StateStore:
    from dicomflow.adapters.firestore_store import FirestoreStateStore

    return FirestoreStateStore.connect(settings.project, settings.firestore_database, clock)


def _cloud_tasks_queue(settings: Settings) -> TaskQueue:
    from dicomflow.adapters.cloud_tasks import CloudTasksQueue

    return CloudTasksQueue.from_settings(settings)


def _lazy_drive(settings: Settings) -> tuple[Callable[[], Any], Callable[[], None]]:
    """One Drive connection per Context, built on first use (credentials are only looked up then);
    and the function that closes it if it was built."""
    holder: list[Any] = []

    def drive() -> Any:
        if not holder:
            from dicomflow.adapters.drive.connection import DriveConnection

            holder.append(DriveConnection.from_settings(settings))
        return holder[0]

    def close() -> None:
        while holder:
            holder.pop().close()

    return drive, close


def drive_sink(settings: Settings) -> Sink:
    """A Drive sink with this process's own Drive credentials (`dicomflow smoke` writes its scratch series)."""
    from dicomflow.adapters.drive.connection import DriveConnection

    sink: Sink = DriveConnection.from_settings(settings).sink()
    return sink


# --- local worker processes -------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalWorkerSpec:
    """Everything a spawned worker process needs to build its own Context (it shares no objects)."""

    settings: Settings
    progress_queue: Any = None
    log_file: str = ""


def local_task_runner(spec: LocalWorkerSpec) -> TaskRunner:
    """Called once in each local worker process (ProcessPoolExecutor initializer). A group of convert tasks
    (small series, see local_runtime.py) runs in threads sharing one GroupingConverter: one dcm2niix
    process for all of them where that is exact, each alone otherwise."""
    logs.configure(spec.settings, file=Path(spec.log_file) if spec.log_file else None)
    ctx = build(spec.settings, progress=_progress_forwarder(spec.progress_queue))

    def run(deliveries: Sequence[Delivery]) -> list[int]:
        if len(deliveries) == 1 or not isinstance(ctx.converter, Dcm2niixConverter):
            return [handle_task(ctx, *delivery).status for delivery in deliveries]
        grouping = GroupingConverter(
            ctx.converter, len(deliveries), ctx.work_dir, timeout_seconds=spec.settings.convert_timeout_seconds
        )
        group_ctx = dataclasses.replace(ctx, converter=grouping)

        def one(delivery: Delivery) -> int:
            try:
                return handle_task(group_ctx, *delivery).status
            finally:
                grouping.done()

        with ThreadPoolExecutor(max_workers=len(deliveries), thread_name_prefix="group") as pool:
            return list(pool.map(one, deliveries))

    return run


def _progress_forwarder(target: Any) -> StepProgress | None:
    """Sends step progress to the parent process, at most every 0.2 s per series (plus phase changes)."""
    if target is None:
        return None
    last: dict[str, tuple[str, float]] = {}

    def forward(batch_id: str, item_id: str, phase: str, done: int, total: int) -> None:
        now = time.monotonic()
        previous = last.get(item_id)
        if previous and previous[0] == phase and now - previous[1] < 0.2 and done < total:
            return
        last[item_id] = (phase, now)
        target.put((batch_id, item_id, phase, done, total))

    return forward
