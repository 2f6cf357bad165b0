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
import logging
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomflow import bootstrap, logs
from dicomflow.adapters.local.private import private_dir, private_file
from dicomflow.adapters.local.queue import LocalRunner, RunStats, SqliteTaskQueue, drain
from dicomflow.config import Settings
from dicomflow.domain.failures import ConfigError
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import Batch, Item, ItemState
from dicomflow.domain.retry import CONTROL_POLICY
from dicomflow.ports import QueueName
from dicomflow.services.context import Context
from dicomflow.services.reconcile import reconcile
from dicomflow.services.submit import BatchRequest, find_resumable, submit

log = logging.getLogger(__name__)

STATE_HOME = Path.home() / ".local" / "state" / "dicomflow"
LAST_STATE = STATE_HOME / "last-state"


def default_state_path(destination: Location) -> Path:
    if destination.kind is LocationKind.LOCAL:
        return Path(destination.ref) / ".dicomflow" / "state.sqlite"
    return STATE_HOME / f"drive-{destination.key}.sqlite"


def remember_state(path: Path) -> None:
    with contextlib.suppress(OSError):
        LAST_STATE.parent.mkdir(parents=True, exist_ok=True)
        LAST_STATE.write_text(str(path.resolve()) + "\n", encoding="utf-8")


def remembered_state() -> Path | None:
    try:
        text = LAST_STATE.read_text(encoding="utf-8").strip()
    except OSError:
        return None
    return Path(text) if text else None


class StateBusy(ConfigError):
    """Another dicomflow process holds the state file."""


@contextlib.contextmanager
def state_lock(state_path: Path) -> Iterator[None]:
    lock_path = state_path.with_name(state_path.name + ".lock")
    try:
        private_dir(lock_path.parent)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the state folder {lock_path.parent} ({exc.strerror}); choose a destination folder "
            "you can write to, or keep the state elsewhere with --state FILE"
        ) from None
    with lock_path.open("a+", encoding="utf-8") as handle:
        private_file(lock_path)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise StateBusy(
                f"another dicomflow run (pid {holder}) is using {state_path}; wait for it to finish"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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
    log_file = state_path.parent / "dicomflow.log"
    with state_lock(state_path):
        progress_queue = multiprocessing.get_context("spawn").Queue()
        spec = bootstrap.LocalWorkerSpec(settings, progress_queue, str(log_file))
        policies = dict.fromkeys(QueueName, CONTROL_POLICY) | {QueueName.CONVERT: settings.retry_policy}
        logs.configure(settings, file=log_file)
        ctx = bootstrap.build(settings)
        # Scratch left by a killed run: no other process can be using it while we hold the lock.
        shutil.rmtree(ctx.work_dir, ignore_errors=True)
        runner = LocalRunner(
            SqliteTaskQueue(state_path),
            workers=settings.worker_count,
            policies=policies,
            runner_factory=bootstrap.local_task_runner,
            factory_arg=spec,
            on_crash=lambda: reconcile(ctx, all_leases_expired=True),
        )
        runner.start()  # workers boot while this process recovers state and submits
        try:
            reconcile(ctx, all_leases_expired=True)
            remember_state(state_path)
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


def dead_letters(ctx: Context, batch_id: str, limit: int = 500) -> list[Item]:
    return ctx.store.list_items(batch_id, frozenset({ItemState.DEAD_LETTERED}), limit=limit)
