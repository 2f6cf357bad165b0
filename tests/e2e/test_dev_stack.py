"""The cloud path end to end on loopback, every part a real process: Firestore emulator, Cloud Tasks
emulator, functions-framework serving functions/main.py, the worker run with the Dockerfile's CMD, and
the `dicomflow` CLI talking to the batch API.

An interceptor stands between Cloud Tasks and the worker to create what production sometimes does:
the same task delivered twice at once to two instances, or a series whose files change under it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dicomflow import devstack, samples
from dicomflow.api_client import ApiClient
from dicomflow.config import load_settings
from tests.support import emulators

pytestmark = pytest.mark.e2e

DICOMFLOW = str(Path(sys.executable).parent / "dicomflow")
MAX_ATTEMPTS = 3


class Interceptor:
    """An HTTP hop in front of the worker(s): forwards each delivery, optionally duplicating it."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.duplicate = False
        self.before: Callable[[dict[str, Any]], None] | None = None
        self.seen: list[tuple[dict[str, Any], int]] = []
        self.lock = threading.Lock()
        interceptor = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower().startswith(("x-cloudtasks", "content-type", "authorization"))
                }
                status, answer = interceptor.forward(body, headers)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *_args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        payload = json.loads(body)
        if self.before is not None:
            self.before(payload)
        targets = self.targets if self.duplicate else self.targets[:1]
        results: list[tuple[int, bytes]] = [(0, b"")] * len(targets)

        def send(index: int, target: str) -> None:
            request = urllib.request.Request(target, data=body, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    results[index] = (response.status, response.read())
            except urllib.error.HTTPError as exc:
                results[index] = (exc.code, exc.read())
            except OSError as exc:
                results[index] = (502, str(exc).encode())

        threads = [threading.Thread(target=send, args=(i, t)) for i, t in enumerate(targets)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        with self.lock:
            self.seen.extend((payload, status) for status, _ in results)
        return results[0]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[devstack.DevStack, Interceptor]]:
    python = emulators.tasks_emulator_python()
    host = emulators.firestore_host()
    interceptor = Interceptor()
    settings = load_settings(
        environ={}, mode="cloud", tasks_emulator_python=python, retry_max_attempts=MAX_ATTEMPTS,
        dispatch_deadline_seconds=15, convert_timeout_seconds=10, lease_seconds=18, reconcile_interval_seconds=2,
        work_dir=str(tmp_path_factory.mktemp("work")),
    )  # fmt: skip
    logs = tmp_path_factory.mktemp("logs")
    with devstack.dev_stack(
        settings, logs, firestore_host=host, tasks_max_retries=MAX_ATTEMPTS - 1,
        task_upstreams={"convert": interceptor.url}, project=emulators.unique_project(),
        local_roots=[Path(tempfile.gettempdir())],
    ) as dev:  # fmt: skip
        interceptor.targets = [dev.urls["worker"], dev.add_worker("worker-2")]
        yield dev, interceptor
    interceptor.close()


def cli(dev: devstack.DevStack, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOME": str(home), "DICOMFLOW_API_URL": dev.api_url, "DICOMFLOW_API_TOKEN": dev.token()}
    return subprocess.run([DICOMFLOW, *args], capture_output=True, text=True, env=env, timeout=300, check=False)


def wait_final(api: ApiClient, batch_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = api.status(batch_id, page_size="500")
        if data["status"] in ("completed", "completed_with_failures", "cancelled", "failed"):
            return data
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} did not finish: {api.status(batch_id)}")


def test_twenty_series_submitted_with_the_cli_all_succeed_with_exact_counters(
    stack: tuple[devstack.DevStack, Interceptor], tmp_path: Path
) -> None:
    dev, _ = stack
    written = samples.make_bench_archive(tmp_path / "dicom", series=20, slices=6, rows=32, cols=32, seed=31)
    submitted = cli(dev, "submit", str(tmp_path / "dicom"), str(tmp_path / "out"), "--label", "twenty", "--json",
                    home=tmp_path)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    batch_id = json.loads(submitted.stdout)["batch_id"]
    watched = cli(dev, "status", batch_id, "--watch", "--json", home=tmp_path)
    assert watched.returncode == 0, watched.stderr
    data = json.loads(watched.stdout)
    assert data["status"] == "completed"
    c = data["counters"]
    assert c["series_total"] == c["succeeded"] == len(written) and c["dead_lettered"] == c["skipped"] == 0
    assert len(list((tmp_path / "out").rglob("*.nii.gz"))) == len(written)
    assert all(i["attempts"] == 1 for i in data["items"])


def test_every_task_delivered_twice_at_once_gives_the_same_outputs_and_counts(
    stack: tuple[devstack.DevStack, Interceptor], tmp_path: Path
) -> None:
    dev, interceptor = stack
    written = samples.make_bench_archive(tmp_path / "dicom", series=6, slices=8, rows=48, cols=48, seed=32)
    interceptor.duplicate = True
    try:
        api = ApiClient(dev.api_url, dev.token())
        batch_id = api.submit({"source": str(tmp_path / "dicom"), "destination": str(tmp_path / "out")})["batch_id"]
        data = wait_final(api, batch_id)
    finally:
        interceptor.duplicate = False
    c = data["counters"]
    assert c["succeeded"] == c["series_total"] == len(written)
    assert all(i["attempts"] == 1 for i in data["items"])  # the second delivery never converted again
    assert len(list((tmp_path / "out").rglob("*.nii.gz"))) == len(written)
    deliveries = [status for payload, status in interceptor.seen if payload.get("batch_id") == batch_id]
    # A duplicate arriving while the first delivery still converts is answered "busy" (503: the task must
    # stay alive in case that attempt fails); one arriving after it finished is a 200 no-op.
    assert len(deliveries) >= 2 * len(written) and set(deliveries) <= {200, 503}


def test_a_corrupt_series_is_dead_lettered_with_its_reason(
    stack: tuple[devstack.DevStack, Interceptor], tmp_path: Path
) -> None:
    dev, _ = stack
    good = samples.write_series(
        tmp_path / "dicom" / "a", samples.SeriesSpec(kind="ct", slices=4, series_number=1), seed=33
    )
    bad = samples.write_series(
        tmp_path / "dicom" / "b", samples.SeriesSpec(kind="ct", slices=4, series_number=2), seed=34
    )
    samples.corrupt_file(bad.paths[1])
    api = ApiClient(dev.api_url, dev.token())
    batch_id = api.submit({"source": str(tmp_path / "dicom"), "destination": str(tmp_path / "out")})["batch_id"]
    data = wait_final(api, batch_id)
    assert data["status"] == "completed_with_failures"
    (failure,) = data["failures"]
    assert failure["series_number"] == 2 and failure["attempts"] == 1
    assert failure["failure"]["permanent"] and "dcm2niix" in failure["failure"]["reason"]
    assert data["counters"]["succeeded"] == 1 and good.n_files == 4
    listed = cli(dev, "dlq", "list", batch_id, home=tmp_path)
    assert "dcm2niix" in listed.stdout


def test_a_series_failing_transiently_every_time_is_dead_lettered_on_the_last_attempt(
    stack: tuple[devstack.DevStack, Interceptor], tmp_path: Path
) -> None:
    dev, interceptor = stack
    series = samples.write_series(tmp_path / "dicom" / "s", samples.SeriesSpec(kind="ct", slices=4), seed=35)
    victim = series.paths[0]

    def grow_a_file(payload: dict[str, Any]) -> None:
        # Before every delivery the series' folder changes (someone is still copying into it).
        with victim.open("ab") as handle:
            handle.write(b"\0" * 16)

    interceptor.before = grow_a_file
    try:
        api = ApiClient(dev.api_url, dev.token())
        batch_id = api.submit({"source": str(tmp_path / "dicom"), "destination": str(tmp_path / "out")})["batch_id"]
        data = wait_final(api, batch_id)
    finally:
        interceptor.before = None
    (failure,) = data["failures"]
    assert failure["attempts"] == MAX_ATTEMPTS  # exactly the queue's attempts: not one fewer
    assert failure["failure"]["code"] == "series_changed" and not failure["failure"]["permanent"]
    statuses = [status for payload, status in interceptor.seen if payload.get("batch_id") == batch_id]
    assert statuses == [503] * (MAX_ATTEMPTS - 1) + [200]  # 5xx while retries remain, 2xx on hand-off


def test_a_worker_killed_mid_series_is_finished_by_the_reconciler(
    stack: tuple[devstack.DevStack, Interceptor], tmp_path: Path
) -> None:
    dev, _ = stack
    spec = samples.SeriesSpec(kind="mr3d", rows=384, columns=384, slices=240, noise=40)  # a few seconds of dcm2niix
    samples.write_series(tmp_path / "dicom" / "big", spec, seed=36)
    api = ApiClient(dev.api_url, dev.token())
    batch_id = api.submit({"source": str(tmp_path / "dicom"), "destination": str(tmp_path / "out")})["batch_id"]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and api.status(batch_id)["counters"]["running"] == 0:
        time.sleep(0.05)
    assert api.status(batch_id)["counters"]["running"] == 1, "the series never started"
    dev.processes["worker"].kill()  # SIGKILL mid-series: like an OOM kill on Cloud Run
    dev.restart("worker")  # Cloud Run starts a new instance; the reconciler finds the lost attempt
    data = wait_final(api, batch_id, timeout=180)
    assert data["status"] == "completed"
    (item,) = data["items"]
    assert item["state"] == "succeeded" and item["attempts"] == 2  # the killed attempt, then the reconciler's
    assert len(list((tmp_path / "out").rglob("*.nii.gz"))) == 1


def test_a_bids_dataset_made_through_the_dev_stack_validates(
    stack: tuple[devstack.DevStack, Interceptor], tmp_path: Path
) -> None:
    # Staged by the workers, placed by the expand function's finish step once the batch is final; the
    # CLI's --wait follows the batch until its report and dataset are written.
    from dicomflow.samples_bids import BIDS_RULES, add_bids_session
    from tests.integration.test_bids_dataset import errors_of, validate

    dev, _ = stack
    add_bids_session(tmp_path / "dicom", subject="11", session="2")
    (tmp_path / "rules.json").write_text(BIDS_RULES)
    submitted = cli(dev, "submit", str(tmp_path / "dicom"), str(tmp_path / "bids"), "--layout", "bids", "--rules",
                    str(tmp_path / "rules.json"), "--wait", "--json", home=tmp_path)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    data = json.loads(submitted.stdout)
    assert data["status"] == "completed" and data["finishing"] is False and data["layout"]["kind"] == "bids"
    assert data["report_ref"] == str(tmp_path / "bids" / "report.html")
    assert errors_of(validate(tmp_path / "bids")) == []
    assert (tmp_path / "bids" / "sub-11" / "ses-2" / "fmap" / "sub-11_ses-2_run-1_phasediff.json").is_file()
    assert not (tmp_path / "bids" / ".dicomflow" / "staging").exists()
