"""Helpers for tests against the fake Drive server (tests/fakes/drive_server.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from dicomflow.adapters.drive.connection import DriveConnection
from dicomflow.config import Settings, load_settings
from tests.fakes.drive_server import FakeDrive

IDENTITY = "dicomflow-worker@project.iam.gserviceaccount.com"


def connection(fake: FakeDrive, **overrides: object) -> DriveConnection:
    return DriveConnection.from_settings(drive_settings(fake, **overrides))


def drive_settings(fake: FakeDrive, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "drive_endpoint": fake.base_url,
        "drive_identity": IDENTITY,
        "drive_max_retry_sleep_seconds": 0.05,  # the client's backoff is real; tests keep it short
    }
    values.update(overrides)
    return load_settings(environ={}, **values)


def upload_tree(fake: FakeDrive, local_root: Path, parent: str) -> dict[str, str]:
    """Mirror a local folder into the fake Drive; returns relative path -> file id."""
    ids: dict[str, str] = {}
    for entry in sorted(local_root.iterdir()):
        if entry.is_dir():
            folder = fake.add_folder(entry.name, parent)
            ids |= {f"{entry.name}/{k}": v for k, v in upload_tree(fake, entry, folder).items()}
        else:
            ids[entry.name] = fake.add_file(entry.name, parent, entry.read_bytes())
    return ids


def started() -> Iterator[FakeDrive]:
    fake = FakeDrive(seed=7)
    fake.start()
    try:
        yield fake
    finally:
        fake.stop()
