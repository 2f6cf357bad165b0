"""Structured logs as Cloud Logging reads them: one JSON object per line, severity, message, labels
batch_id/item_id, the trace of the request (X-Cloud-Trace-Context), an event name metrics can count."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import functions_framework
import pytest

from dicomflow import cloud, samples

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def json_logging(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("DICOMFLOW_MODE", "local")
    monkeypatch.setenv("DICOMFLOW_STATE_PATH", str(tmp_path / "state.sqlite"))
    monkeypatch.setenv("DICOMFLOW_LOG_FORMAT", "json")
    monkeypatch.setenv("DICOMFLOW_PROJECT", "my-project")
    cloud.context.cache_clear()
    yield
    cloud.context.cache_clear()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_dicomflow_handler", False):
            root.removeHandler(handler)


@pytest.mark.usefixtures("json_logging")
def test_function_logs_are_json_lines_with_trace_and_labels(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    series = samples.write_series(tmp_path / "dicom", samples.SeriesSpec(kind="ct", slices=3), seed=71)
    app = functions_framework.create_app(target="batches_api", source=str(REPO / "functions" / "main.py"))
    response = app.test_client().post(
        "/batches",
        json={"source": str(series.folder), "destination": str(tmp_path / "out")},
        headers={"X-Cloud-Trace-Context": "105445aa7843bc8bf206b12000100000/1;o=1"},
    )
    assert response.status_code == 202
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    (submitted,) = [e for e in entries if e.get("event") == "batch_submitted"]
    assert submitted["severity"] == "INFO" and submitted["message"] == "batch submitted"
    assert submitted["logging.googleapis.com/trace"] == "projects/my-project/traces/105445aa7843bc8bf206b12000100000"
    assert submitted["logging.googleapis.com/labels"]["batch_id"] == response.get_json()["batch_id"]
