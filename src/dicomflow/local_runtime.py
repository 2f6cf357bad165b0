"""Running the whole pipeline on one machine: the embedded default behind `dicomflow convert`.

One run at a time per state file (an exclusive lock). At start-up every lease is known to be dead —
no other process can be converting — so the reconciler puts series a crash left `running` back in the
queue; tasks persisted by an interrupted run are delivered again. An unfinished batch with the same
request is resumed rather than started anew, so `kill -9` followed by the same command finishes the job
with exact counters and no duplicate outputs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomflow import bootstrap, logs
from dicomflow.adapters.local.files import DCM2NIIX_MAX_FOLDER_BYTES, SCRATCH_NAME_BYTES
from dicomflow.adapters.local.private import private_dir, private_file
from dicomflow.adapters.local.queue import Grouper, LeasedTask, LocalRunner, RunStats, SqliteTaskQueue, drain
from dicomflow.config import Settings
from dicomflow.domain.failures import ConfigError, DicomflowError
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import Batch, Item, ItemState
from dicomflow.domain.retry import CONTROL_POLICY
from dicomflow.ports import QueueName, StateStore
from dicomflow.services.context import Context
from dicomflow.services.reconcile import reconcile
from dicomflow.services.submit import BatchRequest, find_resumable, submit

log = logging.getLogger(__name__)

RECENT_LIMIT = 50
# SQLite's unix VFS refuses longer file names (MAX_PATHNAME 512, NUL included): "unable to open database file".
SQLITE_MAX_PATH_BYTES = 511
# A reader probing the lock (status: "is this batch's run alive?") holds it for microseconds; a run
# starting at that moment waits this long before it calls the state busy.
LOCK_PATIENCE_SECONDS = 2.0
# Series this small convert faster several to a dcm2niix process than one each (issue 13: process start-up
# dominates them); bigger ones keep a process of their own. A group is at most MAX_GROUP series.
SMALL_SERIES_FILES = 64
SMALL_SERIES_BYTES = 32 * 2**20
MAX_GROUP = 32


def state_home() -> Path:
    """Per-user state outside any destination: Drive destinations' state and the list of recent ones."""
    return Path.home() / ".local" / "state" / "dicomflow"


def default_state_path(destination: Location) -> Path:
    if destination.kind is LocationKind.LOCAL:
        return Path(destination.ref) / ".dicomflow" / "state.sqlite"
    return state_home() / f"drive-{destination.key}.sqlite"


# --- the recent destinations ----------------------------------------------------------------------------
# `status`, `dlq list` and `dlq retry` read the state of the destination they are given. Without one they
# list the destinations used recently (this registry) and let the user choose; nothing ever picks a
# "current" one silently (issue 13: a moving "last state" pointer made users read the wrong batch).


@dataclass(frozen=True, slots=True)
class KnownState:
    path: Path
    used_at: float


def _registry() -> Path:
    return state_home() / "recent-states.json"


@contextlib.contextmanager
def _registry_locked() -> Iterator[Path]:
    path = _registry()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(path.name + ".lock").open("a+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_registry(path: Path) -> list[KnownState]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    known: list[KnownState] = []
    for entry in entries if isinstance(entries, list) else []:
        with contextlib.suppress(KeyError, TypeError, ValueError):
            known.append(KnownState(Path(str(entry["path"])), float(entry["used_at"])))
    return known


def register_state(state_path: Path, now: float) -> None:
    """Remember that a run used this state file (best effort: a read-only home must not stop a run)."""
    state_path = state_path.resolve()
    with contextlib.suppress(OSError), _registry_locked() as path:
        others = [k for k in _read_registry(path) if k.path != state_path]
        entries = [KnownState(state_path, now), *others][:RECENT_LIMIT]
        temp = path.with_name(path.name + f".{os.getpid()}.tmp")
        temp.write_text(json.dumps([{"path": str(k.path), "used_at": k.used_at} for k in entries]), encoding="utf-8")
        temp.replace(path)


def recent_states() -> list[KnownState]:
    """State files used recently that still exist, most recent first."""
    return [k for k in _read_registry(_registry()) if k.path.exists()]


# --- the lock that makes one run at a time per state file -----------------------------------------------


def lock_path(state_path: Path) -> Path:
    return state_path.with_name(state_path.name + ".lock")


def live_holder(state_path: Path) -> int | None:
    """The pid of the dicomflow run using this state file now (0 if it did not say), or None when no run
    is alive: an unfinished batch without one was interrupted."""
    try:
        handle = lock_path(state_path).open("r", encoding="utf-8")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = handle.read().strip()
            return int(text) if text.isdigit() else 0
        fcntl.flock(handle, fcntl.LOCK_UN)
        return None


class StateBusy(ConfigError):
    """Another dicomflow process holds the state file."""


@contextlib.contextmanager
def state_lock(state_path: Path) -> Iterator[None]:
    path = lock_path(state_path)
    try:
        private_dir(path.parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the state folder {path.parent} ({exc.strerror}); choose a destination folder "
            "you can write to, or keep the state elsewhere with --state FILE"
        ) from None
    with path.open("a+", encoding="utf-8") as handle:
        private_file(path)
        deadline = time.monotonic() + LOCK_PATIENCE_SECONDS
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise StateBusy(
                        f"another dicomflow run (pid {holder}) is using {state_path}; wait for it to finish"
                    ) from None
                time.sleep(0.05)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_work_dir(work_dir: Path) -> None:
    """dcm2niix's output folder is a scratch folder inside `work_dir`, and dcm2niix refuses folder paths of
    DCM2NIIX_MAX_FOLDER_BYTES or more: refuse the run at once rather than fail every series after its
    retries (issue 13)."""
    length = len(os.fsencode(str(work_dir))) + SCRATCH_NAME_BYTES
    if length > DCM2NIIX_MAX_FOLDER_BYTES:
        raise ConfigError(
            f"the work folder {work_dir} is too long a path for dcm2niix: it accepts folders of at most "
            f"{DCM2NIIX_MAX_FOLDER_BYTES} bytes, and dicomflow adds up to {SCRATCH_NAME_BYTES} to it. Choose a "
            "destination with a shorter path, or set DICOMFLOW_WORK_DIR (or --state FILE) to a shorter folder."
        )


def small_series_grouper(store: StateStore) -> Grouper:
    """Groups the convert tasks of small series, spread evenly over the worker processes, each group in
    one worker: its series share one dcm2niix run where that is exact (adapters/local/grouped.py). Every
    other task is a group of its own. The cloud keeps one series per task."""

    def small(task: LeasedTask) -> bool:
        if task.queue is not QueueName.CONVERT:
            return False
        try:
            item = store.get_item(str(task.payload["batch_id"]), str(task.payload["item_id"]))
        except (DicomflowError, KeyError):
            return False  # the handler will say what is wrong with it, alone
        return item.file_count <= SMALL_SERIES_FILES and item.bytes_total <= SMALL_SERIES_BYTES

    def grouper(tasks: Sequence[LeasedTask], workers: int) -> list[list[LeasedTask]]:
        marked = [(task, small(task)) for task in tasks]
        count = sum(1 for _, is_small in marked if is_small)
        size = min(MAX_GROUP, max(1, math.ceil(count / max(1, workers))))
        groups: list[list[LeasedTask]] = []
        open_group: list[LeasedTask] | None = None
        for task, is_small in marked:
            if not is_small:
                groups.append([task])
            elif open_group is not None and len(open_group) < size:
                open_group.append(task)
            else:
                open_group = [task]
                groups.append(open_group)
        return groups

    return grouper


@dataclass
class LocalSession:
    settings: Settings
    ctx: Context
    state_path: Path
    log_file: Path
    runner: LocalRunner
    progress_queue: Any


@contextlib.contextmanager
def open_session(settings: Settings) -> Iterator[LocalSession]:
    """Lock the state file, boot the worker processes, configure logging into the state folder and
    recover from any crash of an earlier run."""
    state_path = Path(settings.state_path).expanduser().resolve()
    if len(os.fsencode(str(state_path))) > SQLITE_MAX_PATH_BYTES:
        raise ConfigError(
            f"the state file {state_path} is too long a path for SQLite (at most {SQLITE_MAX_PATH_BYTES} bytes): "
            "choose a destination with a shorter path, or keep the state elsewhere with --state FILE"
        )
    log_file = state_path.parent / "dicomflow.log"
    with state_lock(state_path):
        progress_queue = multiprocessing.get_context("spawn").Queue()
        spec = bootstrap.LocalWorkerSpec(settings, progress_queue, str(log_file))
        policies = dict.fromkeys(QueueName, CONTROL_POLICY) | {QueueName.CONVERT: settings.retry_policy}
        logs.configure(settings, file=log_file)
        ctx = bootstrap.build(settings)
        check_work_dir(ctx.work_dir)
        # Scratch left by a killed run: no other process can be using it while we hold the lock.
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        runner = LocalRunner(
            SqliteTaskQueue(state_path),
            workers=settings.worker_count,
            policies=policies,
            runner_factory=bootstrap.local_task_runner,
            factory_arg=spec,
            on_crash=lambda: reconcile(ctx, all_leases_expired=True),
            grouper=small_series_grouper(ctx.store) if settings.group_small_series else None,
            lease_factor=MAX_GROUP,
        )
        runner.start()  # workers boot while this process recovers state and submits
        try:
            reconcile(ctx, all_leases_expired=True)
            register_state(state_path, time.time())
            yield LocalSession(settings, ctx, state_path, log_file, runner, progress_queue)
        finally:
            runner.close()
            drain(progress_queue, lambda _message: None)
            progress_queue.close()
            progress_queue.join_thread()


def run_queue(session: LocalSession, on_step: Callable[[Any], None], on_tick: Callable[[], None]) -> RunStats:
    """Deliver queued tasks with the worker pool until nothing is left."""

    def tick() -> None:
        drain(session.progress_queue, on_step)
        on_tick()

    session.runner.on_idle_tick = tick
    try:
        stats = session.runner.run()
    finally:
        drain(session.progress_queue, on_step)
    log.info(
        "local queue drained: %d deliveries, %d retried, %d dropped after their last attempt, %d worker crashes",
        stats.delivered, stats.retried, stats.dropped, stats.worker_crashes,
    )  # fmt: skip
    return stats


def start_or_resume(session: LocalSession, request: BatchRequest) -> tuple[Batch, bool]:
    """The unfinished batch for this same request, or a new one. Returns (batch, resumed)."""
    existing = find_resumable(request, session.ctx.store.list_batches(limit=50, counted=False))
    if existing is not None:
        return session.ctx.store.get_batch(existing.batch_id), True  # counted: the CLI reports progress
    return submit(session.ctx, request).batch, False


def all_items(store: StateStore, batch_id: str, states: frozenset[ItemState] | None = None) -> list[Item]:
    """Every series of the batch (in `states`), page by page."""
    items: list[Item] = []
    while page := store.list_items(batch_id, states, after=items[-1].item_id if items else "", limit=1000):
        items.extend(page)
    return items
