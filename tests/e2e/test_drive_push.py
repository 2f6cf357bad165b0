"""Drive push notifications end to end: the fake Drive delivers real HTTP notifications to the webhook,
the changes feed is read, folders settle, batches convert from Drive into a mirrored Drive tree.

Time is simulated (one settable clock for dicomflow and the fake Drive), so "a study uploading for 20
minutes" takes seconds; the dev-stack variant below runs the same story on real processes in real time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import flask
import pytest
from werkzeug.serving import make_server

from dicomflow import bootstrap, devstack, http, samples
from dicomflow.api_client import ApiClient
from dicomflow.config import Settings, load_settings
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.series import ConversionOptions
from dicomflow.ports import QueueName
from dicomflow.services.context import Context
from dicomflow.services.drive_changes import add_watch, renew_channels, settle_folders
from tests.fakes.drive_server import FakeDrive
from tests.support import drive, emulators
from tests.support.fakes import InlineQueue
from tests.support.stores import Clock

pytestmark = pytest.mark.e2e

TOKEN = "s3cret-channel-token"


class Webhook:
    """The real webhook handler served over HTTP on loopback, the address Drive notifies."""

    def __init__(self, ctx: Context) -> None:
        app = flask.Flask("webhook")

        @app.post("/")
        def receive() -> flask.Response:
            return http.drive_webhook(lambda: ctx, flask.request)

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def world(make_settings: Any, tmp_path: Path) -> Iterator[tuple[FakeDrive, Context, InlineQueue, Clock, Webhook]]:
    clock = Clock(1_800_000_000.0)
    fake = FakeDrive(seed=3)
    fake.clock = clock
    fake.delivery_mode = "manual"
    fake.start()
    queue = InlineQueue()
    settings: Settings = make_settings(**{k: v for k, v in drive.drive_settings(fake).__dict__.items()
                                          if k.startswith("drive")}, webhook_token=TOKEN, settle_seconds=300,
                                       webhook_url="http://placeholder/", retry_max_attempts=8)  # fmt: skip
    ctx = bootstrap.build(settings, queue=queue, clock=clock)
    hook = Webhook(ctx)
    ctx.settings = settings.__class__(**{**settings.__dict__, "webhook_url": hook.url})
    try:
        yield fake, ctx, queue, clock, hook
    finally:
        hook.close()
        ctx.close()
        fake.stop()


def drain_changes(ctx: Context, queue: InlineQueue) -> None:
    """Run queued changes tasks (the InlineQueue ignores their delay: the clock is ours)."""
    queue.drain(ctx)


def test_a_study_uploaded_in_bursts_for_twenty_minutes_becomes_exactly_one_batch(
    world: tuple[FakeDrive, Context, InlineQueue, Clock, Webhook], tmp_path: Path
) -> None:
    fake, ctx, queue, clock, _hook = world
    watched = fake.add_folder("Exams DICOM", fake.root_id)
    dest = fake.add_folder("Exams NIfTI", fake.root_id)
    add_watch(ctx, Location(LocationKind.DRIVE, watched), Location(LocationKind.DRIVE, dest), ConversionOptions())
    assert [d.status for d in fake.deliver_pending()] == [200]  # the sync message, accepted and ignored
    assert not queue.pending

    archive = samples.make_demo_archive(tmp_path / "dicom", seed=51)
    patient = fake.add_folder("sub-01", watched)
    local_files = sorted(p for p in (archive.root / "sub-01").rglob("*") if p.is_file())
    folders: dict[Path, str] = {archive.root / "sub-01": patient}
    bursts = [local_files[i : i + 7] for i in range(0, len(local_files), 7)]
    assert len(bursts) >= 20  # the upload really takes twenty simulated minutes and more
    for burst in bursts:
        for path in burst:  # a burst of uploads...
            parent = folders[path.parent] if path.parent in folders else _make_dirs(fake, folders, path.parent)
            fake.add_file(path.name, parent, path.read_bytes())
        assert {d.status for d in fake.deliver_pending()} == {200}
        drain_changes(ctx, queue)
        clock.advance(60)  # ...one minute apart
        assert settle_folders(ctx) == []  # ...never settles while uploads continue

    clock.advance(241)  # quiet for longer than the settle window
    (batch_id,) = settle_folders(ctx)
    queue.drain(ctx)
    batch = ctx.store.get_batch(batch_id)
    converted = [s for s in archive.with_outcome("convert") if s.folder.parts[0] == "sub-01"]
    assert batch.counters.succeeded == len(converted) and batch.sources[0].ref == patient
    (mirror,) = fake.children(dest)
    assert mirror["name"] == "sub-01"  # DEST/<patient folder>/<study>/<series>/...
    images = [f for f in fake.find() if f["name"].endswith(".nii.gz")]
    assert len(images) == sum(len(s.output_suffixes) for s in converted)
    assert all("/".join(fake.path_of(f["id"]).split("/")[:2]) == "Exams NIfTI/sub-01" for f in images)
    assert settle_folders(ctx) == []  # settled once

    # Repeated notifications (Drive may repeat; the fake sends each twice now): no duplicate outputs.
    fake.duplicate_notifications = True
    fake.add_file("README.txt", patient, b"notes")
    fake.deliver_pending()
    drain_changes(ctx, queue)
    clock.advance(400)
    (second,) = settle_folders(ctx)
    queue.drain(ctx)
    again = ctx.store.get_batch(second).counters
    assert again.succeeded == 0 and again.skipped == batch.counters.succeeded + batch.counters.skipped
    assert len([f for f in fake.find() if f["name"].endswith(".nii.gz")]) == len(images)


def _make_dirs(fake: FakeDrive, folders: dict[Path, str], path: Path) -> str:
    if path not in folders:
        folders[path] = fake.add_folder(path.name, _make_dirs(fake, folders, path.parent))
    return folders[path]


def test_wrong_token_or_unknown_channel_is_refused_and_nothing_is_enqueued(
    world: tuple[FakeDrive, Context, InlineQueue, Clock, Webhook], caplog: pytest.LogCaptureFixture
) -> None:
    fake, ctx, queue, _clock, hook = world
    watched = fake.add_folder("w", fake.root_id)
    channel = add_watch(ctx, Location(LocationKind.DRIVE, watched), Location(LocationKind.DRIVE,
                        fake.add_folder("d", fake.root_id)), ConversionOptions())  # fmt: skip
    (sync,) = fake.deliver_pending()
    token = sync.headers["X-Goog-Channel-Token"]  # the channel's own token (only its hash is stored)
    queue.pending.clear()

    def post(headers: dict[str, str]) -> int:
        request = urllib.request.Request(hook.url, data=b"", method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    base = {"X-Goog-Channel-ID": channel.channel_id, "X-Goog-Resource-State": "change",
            "X-Goog-Resource-ID": channel.resource_id, "X-Goog-Message-Number": "5"}  # fmt: skip
    assert post(base | {"X-Goog-Channel-Token": "guess"}) == 403
    assert post(base) == 403  # no token at all
    assert post(base | {"X-Goog-Channel-Token": TOKEN}) == 403  # the shared secret is not this channel's token
    assert post(base | {"X-Goog-Channel-Token": token, "X-Goog-Channel-ID": "unknownchannel"}) == 403
    assert not queue.pending
    assert token not in caplog.text and "guess" not in caplog.text  # no token ever reaches the logs
    assert post(base | {"X-Goog-Channel-Token": token}) == 200
    assert [t.queue for t, _ in queue.pending] == [QueueName.CHANGES]


def test_channels_are_renewed_before_they_expire(world: tuple[FakeDrive, Context, InlineQueue, Clock, Webhook]) -> None:
    fake, ctx, _queue, clock, _hook = world
    watched = fake.add_folder("w", fake.root_id)
    first = add_watch(ctx, Location(LocationKind.DRIVE, watched), Location(LocationKind.DRIVE,
                      fake.add_folder("d", fake.root_id)), ConversionOptions())  # fmt: skip
    assert renew_channels(ctx).renewed == 0  # a week left: nothing to do
    clock.advance(ctx.settings.channel_ttl_seconds - ctx.settings.channel_renew_before_seconds + 60)
    report = renew_channels(ctx)
    assert report.renewed == 1 and report.failed == 0
    (active,) = ctx.store.list_channels()
    assert active.channel_id != first.channel_id and active.page_token == first.page_token
    assert [c["id"] for c in fake.channels] == [active.channel_id]  # the old one was stopped in Drive


def test_dev_stack_push_to_batch_with_faults(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same story on real processes and real time: the fake Drive notifies the webhook function,
    Cloud Tasks (emulator) runs the changes function, the folder settles, the worker converts."""
    python = emulators.tasks_emulator_python()
    host = emulators.firestore_host()
    fake = FakeDrive(seed=9)
    fake.start()
    try:
        settings = load_settings(
            environ={}, mode="cloud", tasks_emulator_python=python, retry_max_attempts=8, settle_seconds=3,
            webhook_window_seconds=2, webhook_token=TOKEN, drive_endpoint=fake.base_url,
            drive_identity=drive.IDENTITY, drive_max_retry_sleep_seconds=0.1, dispatch_deadline_seconds=60,
            convert_timeout_seconds=30, work_dir=str(tmp_path / "work"),
        )  # fmt: skip
        with devstack.dev_stack(settings, tmp_path_factory.mktemp("logs"), firestore_host=host,
                                project=emulators.unique_project()) as dev:  # fmt: skip
            watched = fake.add_folder("DICOM", fake.root_id)
            dest = fake.add_folder("NIfTI", fake.root_id)
            env = {**dev.settings_env, "DICOMFLOW_WEBHOOK_URL": dev.urls["drive_webhook"]}
            added = subprocess.run([str(Path(sys.executable).parent / "dicomflow"), "watch", "add", "--folder",
                                    watched, "--dest", dest], capture_output=True, text=True, timeout=60,
                                   env={**os.environ, **env}, check=False)  # fmt: skip
            assert added.returncode == 0, added.stderr
            series = samples.write_series(tmp_path / "s", samples.SeriesSpec(kind="ct", slices=6), seed=52)
            study = fake.add_folder("study-1", watched)
            fake.fault_rate(0.2, seed=5)
            for path in series.paths:
                fake.add_file(path.name, study, path.read_bytes())
            api = ApiClient(dev.api_url, dev.token())  # the stack's administrator: the watch is an operator's
            deadline = time.monotonic() + 90
            batches: list[dict[str, Any]] = []
            while time.monotonic() < deadline:
                batches = api.batches()
                final = batches and batches[0]["status"] in ("completed", "completed_with_failures")
                if final and not batches[0]["finishing"]:  # its report written too
                    break
                time.sleep(0.5)
            fake.faults.clear()
            assert len(batches) == 1, json.dumps(batches)
            assert batches[0]["status"] == "completed" and batches[0]["counters"]["succeeded"] == 1
            (mirror,) = fake.children(dest)
            assert mirror["name"] == "study-1"
            assert sorted(f["name"] for f in fake.children(mirror["id"])) == [
                "1_CT_Head.json", "1_CT_Head.nii.gz", "report.html",  # the batch's QA report beside its outputs
            ]  # fmt: skip
    finally:
        fake.stop()


def test_watch_list_and_remove_from_the_cli(tmp_path: Path) -> None:
    fake = FakeDrive(seed=4)
    fake.start()
    try:
        env = {**os.environ, "HOME": str(tmp_path), "DICOMFLOW_DRIVE_ENDPOINT": fake.base_url,
               "DICOMFLOW_DRIVE_IDENTITY": drive.IDENTITY, "DICOMFLOW_WEBHOOK_URL": "https://example.invalid/hook",
               "DICOMFLOW_WEBHOOK_TOKEN": TOKEN}  # fmt: skip
        dicomflow = str(Path(sys.executable).parent / "dicomflow")

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([dicomflow, *args], capture_output=True, text=True, env=env, timeout=60, check=False)

        fake.delivery_mode = "manual"  # the address is not reachable from here
        watched, dest = fake.add_folder("w", fake.root_id), fake.add_folder("d", fake.root_id)
        added = run("watch", "add", "--folder", watched, "--dest", dest, "--label", "lab")
        assert added.returncode == 0, added.stderr
        channel_id = json.loads(added.stdout)["channel_id"]
        assert channel_id in run("watch", "list").stdout
        assert [c["id"] for c in fake.channels] == [channel_id]
        assert run("watch", "remove", channel_id).returncode == 0
        assert fake.channels == []  # channels.stop reached Drive
        assert run("watch", "list").stdout.strip() == "no watch channels"
        assert "(stopped)" in run("watch", "list", "--all").stdout
        missing = run("watch", "add", "--folder", "0" * 20, "--dest", dest)
        assert missing.returncode == 1 and drive.IDENTITY in missing.stderr  # names the account to share with
    finally:
        fake.stop()
