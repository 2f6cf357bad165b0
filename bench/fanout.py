"""Fan-out of a 10,000-series batch of 200 files per series (DESIGN.md §8, issue 8): submit latency, time
until every convert task exists, Firestore document writes per series, and the largest request and the
largest document sent to Firestore (limits: 10 MiB per commit, 4 MiB on the emulator; 1 MiB per document).

Real parts: the batch API handler, expansion (list → parallel scan chunks → group), the Cloud Tasks
adapter (its thread pool and retries) and the official Firestore emulator with the real Firestore store.
Stand-ins: the Cloud Tasks client, which takes 20 ms per create_task like a real network round trip and
dispatches expand tasks to a pool of "function instances" the way Cloud Tasks would; and the source: a
Drive-like listing (Drive-sized file ids, realistic folder and file names, sizes and md5s) whose header
reads answer at once, because what is measured is the batch's bookkeeping, not reading two million files.

    python bench/fanout.py [--series 10000] [--files-per-series 200] [--create-ms 20]
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import flask
from google.api_core.exceptions import AlreadyExists
from google.cloud.firestore_v1 import batch as fs_batch

from dicomflow import bootstrap, devstack, http
from dicomflow.adapters.cloud_tasks import CloudTasksQueue
from dicomflow.adapters.firestore_store import FirestoreStateStore
from dicomflow.auth import LocalAuthenticator
from dicomflow.config import load_settings
from dicomflow.domain import model
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import DicomHeader, FileRef
from dicomflow.ports import Attempt, QueueName
from dicomflow.services.tasks import handle_task

WRITES = {"n": 0, "largest_commit": 0, "largest_document": 0}
_LOCK = threading.Lock()
MR = "1.2.840.10008.5.1.4.1.1.4"


def _count_writes() -> None:
    """Count every document write the Firestore client sends, and the largest commit and document in
    bytes as they go over the wire: single-document create/set/update go through a WriteBatch too."""
    original_commit = fs_batch.WriteBatch.commit

    def commit(self: Any, *args: Any, **kwargs: Any) -> Any:
        sizes = [w._pb.ByteSize() for w in self._write_pbs]
        with _LOCK:
            WRITES["n"] += len(sizes)
            WRITES["largest_commit"] = max(WRITES["largest_commit"], sum(sizes))
            WRITES["largest_document"] = max(WRITES["largest_document"], max(sizes, default=0))
        return original_commit(self, *args, **kwargs)

    fs_batch.WriteBatch.commit = commit  # type: ignore[method-assign]


class ListingSource:
    """A Drive-like source of `series` x `files` files: ids, names, sizes and md5s as Drive lists them."""

    def __init__(self, series: int, files: int) -> None:
        self.series, self.files = series, files

    def check(self, location: Location) -> str:
        return "Exams"

    def list_files(self, location: Location) -> Iterator[FileRef]:
        for s in range(self.series):
            folder = f"sub-{s // 40:04d}/ses-{s % 4:02d}/{s:05d}_ep2d_bold_task_rest_run{s % 3}"
            for f in range(self.files):
                file_id = hashlib.sha256(f"{s}/{f}".encode()).hexdigest()[:33]
                yield FileRef(file_id, f"{folder}/IM-{s:05d}-{f:04d}.dcm", 524_288 + f, file_id[:32])


class ListingScanner:
    """Headers of the listing's files, at once (the header scanner's speed is measured by bench/local_overhead)."""

    def scan(self, source: Any, refs: Any) -> list[DicomHeader]:
        return [
            DicomHeader(
                f"2.25.{10**21 + int(r.path[r.path.rindex('-', 0, -9) + 1 : -9])}",
                MR,
                f"2.25.{r.ref}",
                1,
                "MR",
                "ep2d_bold",
            )
            for r in refs
        ]


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
    parser.add_argument("--files-per-series", type=int, default=200)
    parser.add_argument("--create-ms", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--lifecycle-sample", type=int, default=300, help="series taken through claim and success")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="dicomflow-fanout-") as tmp:
        root = Path(tmp)
        print(f"input: {args.series} series x {args.files_per_series} files (a Drive-like listing)")
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
                             dead_letter_url="http://dlq/", changes_url="http://changes/",
                             max_batch_series=max(50_000, args.series))  # fmt: skip
    store = FirestoreStateStore.connect("fanout-bench", "(default)", time.time)
    instances = ThreadPoolExecutor(max_workers=16)  # function instances serving the expand queue
    holder: dict[str, Any] = {}

    def dispatch(task: dict[str, Any]) -> None:
        import json

        payload = json.loads(task["http_request"]["body"])
        instances.submit(deliver, payload)

    def deliver(payload: Any) -> None:
        # Like Cloud Tasks: a non-2xx answer is delivered again after a back-off. The first delivery can
        # beat the batch's commit (submit enqueues, then commits), and is answered 404 until it lands.
        for attempt in range(1, 20):
            if handle_task(holder["ctx"], QueueName.EXPAND, payload, Attempt(retry_count=attempt - 1)).ack:
                return
            time.sleep(min(0.1 * 2**attempt, 5))

    client = FakeTasksClient(args.create_ms / 1000, dispatch)
    client.expected = args.series
    queue = CloudTasksQueue(
        client, project="fanout-bench", location="us-central1",
        queues={q: f"dicomflow-{q.value}" for q in QueueName},
        targets={q: f"http://{q.value}/" for q in QueueName},
    )  # fmt: skip
    source = ListingSource(args.series, args.files_per_series)
    ctx = bootstrap.build(
        settings, store=store, queue=queue,
        sources={LocationKind.LOCAL: lambda: source}, scanners={LocationKind.LOCAL: ListingScanner},
        authenticator=LocalAuthenticator(),  # what is measured is bookkeeping, not identity
    )  # fmt: skip
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
    deadline = time.monotonic() + args.timeout
    while not client.all_created.wait(timeout=30):
        progress = store.get_batch(batch_id, counted=False)
        print(f"  {time.perf_counter() - t0:6.0f} s: {progress.status.value}, {WRITES['n']} documents written, "
              f"{client.convert_created} convert tasks created", flush=True)  # fmt: skip
        if time.monotonic() > deadline:
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
        f"({args.create_ms:.0f} ms per create; every expand instance shares this one Python process)"
    )
    print(f"Firestore writes per series  : {fanout_writes / args.series:7.3f}     (submit + expansion; target <= 3)")
    print(f"  + claim and success        : {lifecycle:7.3f}     (per series, measured on {len(sample)})")
    print(f"  = whole life of a series   : {fanout_writes / args.series + lifecycle:7.3f}")
    print(f"largest Firestore commit     : {WRITES['largest_commit'] / 2**20:7.2f} MiB (limit 10 MiB; emulator 4 MiB)")
    print(f"largest Firestore document   : {WRITES['largest_document'] / 2**10:7.0f} KiB (limit 1 MiB)")


if __name__ == "__main__":
    main()
