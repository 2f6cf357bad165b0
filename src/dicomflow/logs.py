"""Logging set-up: one JSON object per line for Cloud Logging, or short text lines for people.

JSON lines come from google-cloud-logging's StructuredLogHandler, which maps `severity`, `message`,
`logging.googleapis.com/labels` and `logging.googleapis.com/trace` (read from the Flask request's
`traceparent`/`X-Cloud-Trace-Context` header) onto LogEntry fields (GCP_FACTS §7). Every dicomflow
event adds `event` (what log-based metrics count) and its fields to `jsonPayload`; labels carry
`batch_id`/`item_id`. No event carries patient identifiers or source paths.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from dicomflow.adapters.local.private import private_dir, private_file
from dicomflow.config import LogFormat, Settings
from dicomflow.log_privacy import guard

_HANDLER_MARK = "_dicomflow_handler"


class _EventFilter(logging.Filter):
    """Turns `extra={"event":..., "labels":..., "fields":...}` into StructuredLogHandler's inputs."""

    def filter(self, record: logging.LogRecord) -> bool:
        json_fields: dict[str, Any] = dict(getattr(record, "json_fields", {}) or {})
        # StructuredLogHandler drops a `time` field (Cloud Logging stamps entries itself); local log files
        # need a timestamp, so it goes under a name the handler keeps.
        json_fields["logged_at"] = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        event = getattr(record, "event", None)
        if event:
            json_fields["event"] = event
        json_fields.update(getattr(record, "fields", {}) or {})
        record.json_fields = json_fields
        labels = getattr(record, "labels", None)
        record.labels = {str(k): str(v) for k, v in (labels or {}).items()}
        return True


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname:<7} {record.getMessage()}"
        labels = getattr(record, "labels", {}) or {}
        extra = " ".join(f"{k}={v}" for k, v in labels.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return f"{base}  [{extra}]" if extra else base


class _LocalJsonFormatter(logging.Formatter):
    """The same JSON shape as StructuredLogHandler's, for local log files, without importing the Cloud
    Logging client (0.4 s per process: local runs start several)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = dict(getattr(record, "json_fields", {}) or {})
        entry["message"] = record.getMessage()
        entry["severity"] = record.levelname
        entry["logging.googleapis.com/labels"] = {"python_logger": record.name, **(getattr(record, "labels", {}) or {})}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def _json_handler(project: str, stream: IO[str]) -> logging.Handler:
    """Cloud Run / Functions: StructuredLogHandler adds the trace of the Flask request being served."""
    from google.cloud.logging_v2.handlers import StructuredLogHandler

    handler: logging.Handler = StructuredLogHandler(  # type: ignore[no-untyped-call]
        project_id=project or None, stream=stream
    )
    return handler


def configure(settings: Settings, *, stream: IO[str] | None = None, file: Path | None = None) -> None:
    """Install dicomflow's handler on the root logger (idempotent: replaces a previous one)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    if file is not None:
        private_dir(file.parent)
        local = logging.FileHandler(file, encoding="utf-8")
        private_file(file)  # a local log may name source files by path: the user's eyes only
        local.setFormatter(_LocalJsonFormatter())
        handlers.append(local)
    else:
        out = stream or sys.stdout
        if settings.log_format is LogFormat.JSON:
            handlers.append(_json_handler(settings.project, out))
        else:
            text = logging.StreamHandler(out)
            text.setFormatter(_TextFormatter())
            handlers.append(text)
    for handler in handlers:
        # First: records of client libraries (googleapiclient logs request URIs with Drive queries, which
        # name folders; pydicom quotes tag values) are redacted before anything formats them.
        guard(handler)
        handler.addFilter(_EventFilter())
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    logging.captureWarnings(True)  # library warnings go through the same redacting handlers
    # Client libraries are chatty at INFO and may log request URLs; keep them at WARNING.
    for noisy in ("googleapiclient", "google", "urllib3", "grpc", "werkzeug", "gunicorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
