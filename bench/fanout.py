"""Fan-out of a 10,000-series batch (DESIGN.md §8): submit latency, time until every convert task exists,
and Firestore document writes per series.

Real parts: the batch API handler, expansion (list → parallel scan chunks → group), the Cloud Tasks
adapter (its thread pool and retries) and the official Firestore emulator. Stand-in: the Cloud Tasks
client, which takes 20 ms per create_task like a real network round trip, and dispatches expand tasks to
a pool of "function instances" the way Cloud Tasks would. Targets: submit < 2 s, all tasks < 60 s,
writes per series <= 3 (fan-out), and the whole item life cycle is reported too.

    python bench/fanout.py [--series 10000] [--create-ms 20]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flask
import pydicom
from google.api_core.exceptions import AlreadyExists
from google.cloud.firestore_v1 import batch as fs_batch
from pydicom.dataset import FileMetaDataset

from dicomflow import bootstrap, devstack, http
from dicomflow.adapters.cloud_tasks import CloudTasksQueue
from dicomflow.adapters.firestore_store import FirestoreStateStore
from dicomflow.config import load_settings
from dicomflow.domain import model
from dicomflow.ports import Attempt, QueueName
from dicomflow.services.tasks import handle_task

WRITES = {"n": 0}
_LOCK = threading.Lock()


def _count_writes() -> None:
    """Count every document write the Firestore client sends: single-document create/set/update go
    through a WriteBatch too, so counting batch commits counts everything once."""
    original_commit = fs_batch.WriteBatch.commit

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        with _LOCK:
            WRITES["n"] += len(self._write_pbs)
        return original_commit(self, *args, **kwargs)

    fs_batch.WriteBatch.commit = commit  # type: ignore[method-assign]


def write_tiny_series(root: Path, count: int) -> None:
    """`count` single-file series (8x8 pixels): the cost under test is per series, not per pixel."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    root.mkdir(parents=True, exist_ok=True)
    for n in range(count):
        ds = pydicom.Dataset()
        ds.file_meta = meta
        meta.MediaStorageSOPInstanceUID = f"2.25.{10**20 + n}"
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.Modality = f"2.25.{10**21 + n}", n % 9999 + 1, "MR"
        ds.Rows = ds.Columns = 8
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = b"\0" * 128
        ds.save_as(root / f"{n:05d}.dcm", enforce_file_format=True)


class FakeTasksClient:
    """create_task takes `delay` seconds and refuses a task name seen before (AlreadyExists), like Cloud
    Tasks; expand tasks are dispatched to a pool of function instances."""

    def __init__(self, delay: float, dispatch: Any) -> None:
        self.delay = delay
        self.dispatch = dispatch
        self.convert_created = 0
        self.all_created = threading.Event()
        self.expected = 0
        self.names: set[str] = set()
        self.lock = threading.Lock()

    def queue_path(self, project: str, location: str, queue: str) -> str:
        return f"projects/{project}/locations/{location}/queues/{queue}"

    def create_task(self, parent: str, task: dict[str, Any], timeout: float) -> None:
        time.sleep(self.delay)
        with self.lock:
            if task["name"] in self.names:
                raise AlreadyExists(task["name"])
            self.names.add(task["name"])
        if parent.endswith("-expand"):
            self.dispatch(task)
        elif parent.endswith("-convert"):
            with self.lock:
                self.convert_created += 1
                if self.convert_created >= self.expected:
                    self.all_created.set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=10_000)
    parser.add_argument("--create-ms", type=float, default=20.0)
    parser.add_argument("--lifecycle-sample", type=int, default=300, help="series taken through claim and success")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dicomflow-fanout-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        write_tiny_series(root / "dicom", args.series)
        print(f"input: {args.series} single-file series (written in {time.perf_counter() - started:.1f} s)")
        emulator, host = devstack.start_firestore(root / "logs")
        try:
            run(root, host, args)
        finally:
            emulator.stop()


def run(root: Path, host: str, args: argparse.Namespace) -> None:
    import os

    os.environ["FIRESTORE_EMULATOR_HOST"] = host
    settings = load_settings(environ={}, mode="cloud", project="fanout-bench", region="us-central1",
                             worker_url="http://worker/", expand_url="http://expand/", allow_local_paths=True,
                             dead_letter_url="http://dlq/", changes_url="http://changes/")  # fmt: skip
    store = FirestoreStateStore.connect("fanout-bench", "(default)", time.time)
    instances = ThreadPoolExecutor(max_workers=16)  # function instances serving the expand queue
    holder: dict[str, Any] = {}

    def dispatch(task: dict[str, Any]) -> None:
        import json

        payload = json.loads(task["http_request"]["body"])
        instances.submit(handle_task, holder["ctx"], QueueName.EXPAND, payload, Attempt())

    client = FakeTasksClient(args.create_ms / 1000, dispatch)
    client.expected = args.series
    queue = CloudTasksQueue(
        client, project="fanout-bench", location="us-central1",
        queues={q: f"dicomflow-{q.value}" for q in QueueName},
        targets={q: f"http://{q.value}/" for q in QueueName},
    )  # fmt: skip
    ctx = bootstrap.build(settings, store=store, queue=queue)
    holder["ctx"] = ctx
    app = flask.Flask("bench")

    @app.post("/batches")
    def batches() -> flask.Response:
        return http.batches_api(lambda: ctx, flask.request)

    _count_writes()
    t0 = time.perf_counter()
    response = app.test_client().post(
        "/batches", json={"source": str(root / "dicom"), "destination": str(root / "out")}
    )
    submit_seconds = time.perf_counter() - t0
    assert response.status_code == 202, response.data
    batch_id = response.get_json()["batch_id"]
    if not client.all_created.wait(timeout=600):
        raise SystemExit(f"only {client.convert_created} of {args.series} convert tasks were created")
    fanout_seconds = time.perf_counter() - t0
    instances.shutdown(wait=True)
    fanout_writes = WRITES["n"]
    counters = store.get_batch(batch_id).counters

    # The rest of an item's life: claim (lease) and success, on a sample.
    sample = store.list_items(batch_id, limit=args.lifecycle_sample)
    before = WRITES["n"]
    for item in sample:
        store.update_item(batch_id, item.item_id, lambda i: model.claim(i, time.time(), 1800, "bench"))
        store.update_item(batch_id, item.item_id, lambda i: model.succeed(i, time.time(), (), model.Timings(), ()))
    lifecycle = (WRITES["n"] - before) / max(1, len(sample))

    print(f"series in batch: {counters.series_total} (pending {counters.pending})")
    print(f"submit answered in           : {submit_seconds:7.3f} s   (target < 2 s)")
    print(
        f"all {args.series} convert tasks created: {fanout_seconds:7.2f} s   "
        f"(target < 60 s, {args.create_ms:.0f} ms per create)"
    )
    print(f"Firestore writes per series  : {fanout_writes / args.series:7.3f}     (submit + expansion; target <= 3)")
    print(f"  + claim and success        : {lifecycle:7.3f}     (per series, measured on {len(sample)})")
    print(f"  = whole life of a series   : {fanout_writes / args.series + lifecycle:7.3f}")


if __name__ == "__main__":
    main()
