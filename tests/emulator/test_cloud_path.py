"""The cloud path's guarantees against the real Firestore emulator, through the worker's HTTP edge with
synthetic X-CloudTasks-* headers (the Cloud Tasks emulator has no backoff and no retry headers worth
testing against, GCP_FACTS gotcha 15)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import flask
import pytest

from dicomflow import bootstrap, http, samples
from dicomflow.adapters.dcm2niix import Dcm2niixConverter
from dicomflow.adapters.firestore_store import FirestoreStateStore
from dicomflow.config import Settings
from dicomflow.domain import model
from dicomflow.domain.failures import Failure
from dicomflow.domain.locations import parse_location
from dicomflow.domain.model import BatchStatus, ItemState
from dicomflow.domain.series import ConversionOptions, FileRef, SeriesGroup, SeriesKey
from dicomflow.ports import QueueName, Task
from dicomflow.services.context import Context
from dicomflow.services.progress import maybe_complete
from dicomflow.services.reconcile import ReconcileReport, reconcile
from dicomflow.services.submit import BatchRequest, submit
from tests.support import emulators
from tests.support.fakes import InlineQueue, ScriptedConverter
from tests.support.stores import Clock

pytestmark = pytest.mark.emulator


@pytest.fixture
def store() -> Iterator[FirestoreStateStore]:
    yield from emulators.firestore_store(Clock(0))


def _store_with_clock(clock: Callable[[], float]) -> FirestoreStateStore:
    emulators.firestore_host()
    return FirestoreStateStore.connect(emulators.unique_project(), "(default)", clock)


def worker_client(ctx: Context) -> Any:
    app = flask.Flask("worker-under-test")

    @app.post("/")
    def convert() -> flask.Response:
        return http.handle_task_request(lambda: ctx, QueueName.CONVERT, flask.request)

    return app.test_client()


def expand_all(ctx: Context, queue: InlineQueue) -> list[Task]:
    """Run expansion tasks; keep (and return) the convert tasks for the test to deliver itself."""
    convert: list[Task] = []
    while queue.pending:
        task, _ = queue.pending.popleft()
        if task.queue is QueueName.CONVERT:
            convert.append(task)
            continue
        queue.pending.appendleft((task, 0))
        queue.drain(ctx, max_deliveries=1)
    return convert


def deliver(client: Any, task: Task, retry_count: int) -> Any:
    return client.post("/", json=dict(task.payload), headers={
        "X-CloudTasks-TaskRetryCount": str(retry_count), "X-CloudTasks-TaskName": task.task_id,
        "X-CloudTasks-QueueName": "projects/p/locations/l/queues/convert"})  # fmt: skip


def test_a_transient_failure_on_every_attempt_is_dead_lettered_on_the_last_not_before(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    archive = samples.write_series(tmp_path / "dicom" / "ct", samples.SeriesSpec(kind="ct", slices=4), seed=4)
    queue = InlineQueue()
    store = _store_with_clock(time.time)
    converter = ScriptedConverter(Dcm2niixConverter(60), {"1_CT_Head": [137] * 10})
    settings = make_settings(retry_max_attempts=4)
    ctx = bootstrap.build(settings, store=store, queue=queue, converter=converter)
    batch = submit(ctx, BatchRequest((parse_location(str(archive.folder), field="s"),),
                                     parse_location(str(tmp_path / "out"), field="d"))).batch  # fmt: skip
    (task,) = expand_all(ctx, queue)
    client = worker_client(ctx)
    statuses = [deliver(client, task, n).status_code for n in range(4)]
    assert statuses == [503, 503, 503, 200]  # retried until the queue's last attempt, then handed off
    item = store.get_item(batch.batch_id, task.payload["item_id"])
    assert item.state is ItemState.RUNNING and item.failure is not None  # noted, not yet dead-lettered
    (dlq,) = [t for t, _ in queue.pending if t.queue is QueueName.DEAD_LETTER]
    queue.drain(ctx)
    queue.enqueue([dlq])  # a duplicate dead-letter delivery
    queue.drain(ctx)
    final = store.get_batch(batch.batch_id)
    assert final.counters.dead_lettered == 1 and final.counters.series_total == 1
    assert final.status is BatchStatus.COMPLETED_WITH_FAILURES
    assert store.get_item(batch.batch_id, item.item_id).attempts == 4
    assert converter.calls.count("1_CT_Head") == 4


def test_the_same_task_delivered_twice_at_once_converts_once(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    archive = samples.write_series(tmp_path / "dicom" / "mr", samples.SeriesSpec(kind="mr3d", slices=20), seed=5)
    queue = InlineQueue()
    store = _store_with_clock(time.time)
    release = threading.Event()
    calls: list[str] = []

    class HeldConverter(Dcm2niixConverter):
        """Holds the winning attempt inside dcm2niix until the test has seen the duplicate's answer."""

        def convert(self, *args: Any, **kwargs: Any) -> Any:
            calls.append("convert")
            assert release.wait(timeout=30)
            return super().convert(*args, **kwargs)

    ctx = bootstrap.build(make_settings(), store=store, queue=queue, converter=HeldConverter(60))
    batch = submit(ctx, BatchRequest((parse_location(str(archive.folder), field="s"),),
                                     parse_location(str(tmp_path / "out"), field="d"))).batch  # fmt: skip
    (task,) = expand_all(ctx, queue)
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(deliver, worker_client(ctx), task, 0) for _ in range(2)]
        done, running = wait(futures, timeout=30, return_when=FIRST_COMPLETED)
        (duplicate,) = done
        # Answered at once, "retry later": another attempt holds the lease, and if that attempt fails the
        # task must still be alive to deliver the series again.
        assert duplicate.result().status_code == 503
        assert duplicate.result().get_json()["outcome"] == "busy"
        assert store.get_item(batch.batch_id, task.payload["item_id"]).state is ItemState.RUNNING
        release.set()
        (winner,) = running
        assert winner.result(timeout=60).status_code == 200
    item = store.get_item(batch.batch_id, task.payload["item_id"])
    assert (item.state, item.attempts, calls) == (ItemState.SUCCEEDED, 1, ["convert"])
    assert store.get_batch(batch.batch_id).counters.succeeded == 1
    assert len(list((tmp_path / "out").rglob("*.nii.gz"))) == 1
    late = deliver(worker_client(ctx), task, 1)  # a late redelivery after success: a no-op
    assert late.status_code == 200 and late.get_json()["outcome"] == "duplicate"


def test_a_thousand_concurrent_completions_on_one_batch_count_exactly(
    store: FirestoreStateStore, make_settings: Callable[..., Settings], caplog: pytest.LogCaptureFixture
) -> None:
    now = 1000.0
    batch = model.Batch("big", (parse_location("/in", field="s"),), parse_location("/out", field="d"),
                        ConversionOptions(), "", BatchStatus.EXPANDING, now, now)  # fmt: skip
    store.create_batch(batch)
    items = []
    for n in range(1000):
        group = SeriesGroup(SeriesKey(f"1.2.{n}", "1.2.840.10008.5.1.4.1.1.4"), (FileRef(f"/in/{n}", f"{n}", 1),),
                            (f"9.{n}",), "", n, "MR", "x", output_stem=f"{n}_x")  # fmt: skip
        items.append(model.new_item(batch, group, f"fp{n}", now))
    store.add_items(items)
    store.update_batch("big", lambda b: model.finish_expansion(b, now, 1000, 0, ()))
    ctx = bootstrap.build(make_settings(), store=store, queue=InlineQueue())
    errors: list[BaseException] = []

    def complete(item: model.Item) -> None:
        try:
            store.update_item("big", item.item_id, lambda i: model.claim(i, now, 600, "w"))
            _, changed = store.update_item(
                "big", item.item_id, lambda i: model.succeed(i, now, (), model.Timings(), ())
            )
            assert changed
            maybe_complete(ctx, "big")
        except BaseException as exc:
            errors.append(exc)

    caplog.set_level(logging.INFO, logger="dicomflow")
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(complete, items))
    assert errors == []
    final = store.get_batch("big")
    assert final.counters.succeeded == final.counters.series_total == 1000
    assert final.status is BatchStatus.COMPLETED
    completions = [r for r in caplog.records if getattr(r, "event", "") == "batch_completed"]
    assert len(completions) == 1  # the batch was completed once, however many workers saw it finish


def test_reconciler_requeues_a_crashed_attempt_and_dead_letters_one_that_crashed_on_its_last(
    make_settings: Callable[..., Settings],
) -> None:
    clock = Clock(10_000.0)
    store = _store_with_clock(clock)
    queue = InlineQueue()
    ctx = bootstrap.build(make_settings(retry_max_attempts=3, dispatch_deadline_seconds=60), store=store,
                          queue=queue, clock=clock)  # fmt: skip
    batch = model.Batch("b", (parse_location("/in", field="s"),), parse_location("/out", field="d"),
                        ConversionOptions(), "", BatchStatus.EXPANDING, clock(), clock())  # fmt: skip
    store.create_batch(batch)
    groups = [SeriesGroup(SeriesKey(f"1.{n}", "x"), (), (), "", n, "MR", "", output_stem=str(n)) for n in (1, 2)]
    first_try, last_try = (model.new_item(batch, g, f"f{g.series_number}", clock()) for g in groups)
    store.add_items([first_try, last_try])
    store.update_batch("b", lambda b: model.finish_expansion(b, clock(), 0, 0, ()))
    lease = ctx.settings.lease_seconds
    # last_try: its first two attempts crashed (the reconciler re-released them), the third is running.
    crash = Failure("worker_interrupted", "x", permanent=False)
    for _ in range(2):
        claimed, _ = store.update_item("b", last_try.item_id, lambda i: model.claim(i, clock(), lease, "w"))
        clock.advance(lease + 1)
        store.update_item("b", last_try.item_id, lambda i, seen=claimed: model.release_orphan(i, clock(), crash, seen))
    store.update_item("b", last_try.item_id, lambda i: model.claim(i, clock(), lease, "crashed-on-last"))
    store.update_item("b", first_try.item_id, lambda i: model.claim(i, clock(), lease, "crashed-on-first"))

    assert reconcile(ctx) == ReconcileReport()  # leases still live: nothing to do
    clock.advance(lease + 1)  # both workers are gone: their leases expire
    assert reconcile(ctx) == ReconcileReport(requeued=1, dead_lettered=1)

    requeued = store.get_item("b", first_try.item_id)
    assert (requeued.state, requeued.attempts) == (ItemState.RETRYING, 1)
    (task,) = [t for t, _ in queue.pending if t.queue is QueueName.CONVERT]
    # A fresh task name (the first one may stay blocked for a day), and the one the series now waits for.
    assert task.payload["item_id"] == first_try.item_id and task.task_id == requeued.task_id
    assert task.task_id != first_try.task_id
    dead = store.get_item("b", last_try.item_id)
    assert (dead.state, dead.attempts) == (ItemState.DEAD_LETTERED, 3)
    assert dead.failure is not None and dead.failure.code == "worker_interrupted"
    assert "ran out of memory" in dead.failure.reason
    counters = store.get_batch("b").counters
    assert (counters.dead_lettered, counters.retrying, counters.series_total) == (1, 1, 2)
    assert reconcile(ctx) == ReconcileReport()  # idempotent: a second run changes nothing
