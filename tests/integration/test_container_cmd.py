"""The worker image's command: the exact CMD of container/Dockerfile, run in this virtualenv (no Docker
engine here), converts a series sent to it over HTTP as Cloud Tasks would."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from dicomflow import bootstrap, devstack, samples
from dicomflow.config import Settings
from dicomflow.domain.locations import Location, LocationKind
from dicomflow.domain.model import ItemState
from dicomflow.ports import QueueName
from dicomflow.services.submit import BatchRequest, submit
from tests.support.fakes import InlineQueue

pytestmark = pytest.mark.integration


def test_the_dockerfile_cmd_serves_the_worker_and_converts_a_series(make_settings: object, tmp_path: Path) -> None:
    command = devstack.dockerfile_cmd()
    assert command[0] == "gunicorn" and "--workers=1" in command and "--threads=1" in command  # one at a time
    settings: Settings = make_settings()  # type: ignore[operator]
    queue = InlineQueue()
    ctx = bootstrap.build(settings, queue=queue)
    series = samples.write_series(tmp_path / "dicom" / "t1", samples.SeriesSpec(kind="mr3d", slices=8), seed=61)
    batch = submit(ctx, BatchRequest((Location(LocationKind.LOCAL, str(series.folder)),),
                                     Location(LocationKind.LOCAL, str(tmp_path / "out")))).batch  # fmt: skip
    while queue.pending and queue.pending[0][0].queue is QueueName.EXPAND:
        queue.drain(ctx, max_deliveries=1)
    (task, _retry) = queue.pending.popleft()
    assert task.queue is QueueName.CONVERT

    port = devstack.free_port()
    env = {**os.environ, "PORT": str(port), "DICOMFLOW_MODE": "local", "DICOMFLOW_STATE_PATH": settings.state_path,
           "DICOMFLOW_WORK_DIR": settings.work_dir, "DICOMFLOW_LOG_FORMAT": "json"}  # fmt: skip
    command[0] = str(Path(sys.executable).parent / command[0])
    worker = devstack.start_process("worker-cmd", command, tmp_path / "logs", env=env, cwd=devstack.REPO / "container")
    try:
        devstack.wait_port(port, worker, timeout=60)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/", data=json.dumps(dict(task.payload)).encode(), method="POST",
            headers={"Content-Type": "application/json", "X-CloudTasks-TaskRetryCount": "0",
                     "X-CloudTasks-TaskName": task.task_id},
        )  # fmt: skip
        started = time.monotonic()
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            body = response.read()
        assert b'"outcome":"succeeded"' in body
        assert time.monotonic() - started < 120
    finally:
        worker.stop()
    item = ctx.store.get_item(batch.batch_id, task.payload["item_id"])
    assert item.state is ItemState.SUCCEEDED
    (image,) = (tmp_path / "out").rglob("*.nii.gz")
    assert image.stat().st_size > 0
    logged = (tmp_path / "logs" / "worker-cmd.log").read_text()
    assert '"event": "series_succeeded"' in logged  # one JSON object per line, on stdout, for Cloud Logging
    ctx.close()
